"""Training the attribute classifier on Ray Train (TorchTrainer, DDP: gloo on CPU, NCCL on GPU).

The driver (`train_classifier`) reads label statistics once (prevalences for the rare-class weights, the age mean
and spread), then `train_loop_per_worker` fits the network on each worker's shard of the decoded rows. A rerun
with the same run name resumes from the last epoch's checkpoint. Calibration and evaluation follow on the driver
(`cfgen.classify.calibrate`, `cfgen.classify.evaluate`).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cfgen.classify.labels import REGRESSION_ATTRIBUTES, label_targets
from cfgen.classify.network import AttributeClassifier, masked_loss, network_config
from cfgen.config import ClassifierConfig, JobConfig

_STATE_FILE = "classifier.pt"


def label_statistics(labels: dict[str, np.ndarray], cfg: ClassifierConfig, policy: str) -> dict[str, Any]:
    """Per attribute: known labels, positives, the BCE positive weight (n_neg / n_pos, capped), and age mean/sd.

    An attribute with no known label (or, if binary, only one class) cannot be learnt: that is the caller's
    mistake in the config, so it is an error here, before any worker starts."""
    targets, known = label_targets(labels, cfg.attributes, policy)
    stats: dict[str, Any] = {"attributes": {}, "pos_weight": []}
    problems = []
    for k, name in enumerate(cfg.attributes):
        t = targets[known[:, k], k]
        entry = {"known": int(len(t))}
        if name in REGRESSION_ATTRIBUTES:
            if len(t) < 2:
                problems.append(f"{name}: {len(t)} known values")
            entry.update(mean=float(t.mean()) if len(t) else 0.0, sd=float(t.std()) if len(t) > 1 else 1.0)
            stats["pos_weight"].append(1.0)
        else:
            pos = int(t.sum())
            entry.update(positives=pos)
            if pos == 0 or pos == len(t):
                problems.append(f"{name}: {len(t)} known labels, {pos} positive")
            weight = (len(t) - pos) / max(pos, 1)
            stats["pos_weight"].append(float(min(cfg.train.max_pos_weight, max(1.0, weight))))
        stats["attributes"][name] = entry
    if problems:
        raise ValueError("the training data cannot teach these classifier attributes (no labels, or only one "
                         "class): " + "; ".join(problems) + ". Remove them from classifier.attributes or add labels.")
    age = stats["attributes"].get("age", {})
    stats["age_mean"], stats["age_sd"] = age.get("mean", 55.0), max(1.0, age.get("sd", 15.0))
    return stats


def decorrelation_tables(labels: dict[str, np.ndarray], cfg: ClassifierConfig, policy: str) -> list[dict[str, Any]]:
    """For every pair of binary attributes whose known labels correlate beyond `decorrelate` (|phi|), the 2x2
    table of weights P(a) P(b) / P(a, b): weighted by it, the pair is independent, so a device no longer predicts
    an effusion and the classifier has to find the effusion itself (the confounding DESIGN.md §3 plants)."""
    threshold = cfg.train.decorrelate
    if threshold is None:
        return []
    targets, known = label_targets(labels, cfg.attributes, policy)
    binary = [k for k, a in enumerate(cfg.attributes) if a not in REGRESSION_ATTRIBUTES]
    tables = []
    for x, i in enumerate(binary):
        for j in binary[x + 1:]:
            both = known[:, i] & known[:, j]
            if both.sum() < 20:
                continue
            a, b = targets[both, i], targets[both, j]
            if a.std() == 0 or b.std() == 0:
                continue
            phi = float(np.corrcoef(a, b)[0, 1])
            if abs(phi) <= threshold:
                continue
            joint = np.array([[np.mean((a == u) & (b == v)) for v in (0, 1)] for u in (0, 1)])
            marginal = np.outer([1 - a.mean(), a.mean()], [1 - b.mean(), b.mean()])
            weights = np.clip(marginal / np.maximum(joint, 1e-6), 0.1, 10.0)
            tables.append({"i": i, "j": j, "pair": [cfg.attributes[i], cfg.attributes[j]], "phi": phi,
                           "weights": weights.tolist()})
    return tables


def sample_weights(targets: np.ndarray, known: np.ndarray, tables: list[dict[str, Any]]) -> np.ndarray:
    """Per-image weight: the product of the decorrelation weights of each pair both of whose labels are known."""
    w = np.ones(len(targets), dtype=np.float32)
    for t in tables:
        i, j, table = t["i"], t["j"], np.asarray(t["weights"], dtype=np.float32)
        both = known[:, i] & known[:, j]
        w[both] *= table[targets[both, i].astype(int), targets[both, j].astype(int)]
    return w


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    from cfgen.classify.augment import random_rigid

    job = JobConfig.model_validate(loop_config["job"])
    cfg = job.classifier
    tc = cfg.train
    if not tc.use_gpu:
        torch.set_num_threads(max(1, int(tc.cpus_per_worker)))
    rank = ray.train.get_context().get_world_rank()
    device = ray.train.torch.get_device()
    torch.manual_seed(tc.seed)  # every rank starts from the same weights (DDP broadcasts rank 0's anyway)

    model = AttributeClassifier(loop_config["network_config"]).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    pos_weight = torch.tensor(loop_config["pos_weight"], device=device)
    start_epoch = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            state = torch.load(Path(folder) / _STATE_FILE, map_location=device, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch = int(state["epoch"])
    ddp = ray.train.torch.prepare_model(model)
    steps_per_epoch = max(1, int(loop_config["steps_per_epoch"]))
    total = steps_per_epoch * tc.epochs
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=tc.lr, total_steps=total, pct_start=0.15)
    for _ in range(start_epoch * steps_per_epoch):
        schedule.step()

    shard = ray.train.get_dataset_shard("train")
    policy = loop_config["policy"]
    tables, weight_scale = loop_config["decorrelation"], float(loop_config["weight_scale"])
    for epoch in range(start_epoch, tc.epochs):
        generator = torch.Generator().manual_seed(tc.seed * 1000 + epoch * 10 + rank)
        losses, step = [], 0
        for batch in shard.iter_batches(batch_size=tc.batch_size, batch_format="numpy", drop_last=True,
                                        local_shuffle_buffer_size=4 * tc.batch_size,
                                        local_shuffle_seed=tc.seed + epoch * 7919 + rank):
            if step >= steps_per_epoch:  # equal step counts on every rank keep DDP's all-reduce in step
                break
            targets, known = label_targets(batch, cfg.attributes, policy)
            weights = sample_weights(targets, known, tables) / weight_scale
            x = torch.from_numpy(_unit(batch["image"])).unsqueeze(1)
            if tc.augment:
                x = random_rigid(x, generator)
            logits = ddp(x.to(device))
            loss = masked_loss(model, logits, torch.from_numpy(targets).to(device),
                               torch.from_numpy(known).to(device), pos_weight, torch.from_numpy(weights).to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
            step += 1
        if step < steps_per_epoch:
            raise ValueError(f"worker {rank} got {step} batches of {tc.batch_size} in epoch {epoch}, fewer than "
                             f"{steps_per_epoch}: lower classifier.train.batch_size or num_workers")
        metrics = {"epoch": epoch + 1, "loss": float(np.mean(losses))}
        with tempfile.TemporaryDirectory() as folder:
            if rank == 0:
                torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch + 1},
                           Path(folder) / _STATE_FILE)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder) if rank == 0 else None)


def _unit(images: np.ndarray) -> np.ndarray:
    from cfgen.metrics.image import as_unit_float

    return np.ascontiguousarray(as_unit_float(np.asarray(images)))


def fit_classifier(job: JobConfig, train_ds, label_columns: dict[str, np.ndarray], n_train: int,
                   storage_path: str, storage_fs=None) -> tuple[AttributeClassifier, dict[str, Any]]:
    """Fit on `train_ds` with Ray Train; returns the trained (uncalibrated) model and the label statistics."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from cfgen.classify.labels import uncertain_policy

    cfg = job.classifier
    tc = cfg.train
    policy = uncertain_policy(cfg, job.data.prompt)
    stats = label_statistics(label_columns, cfg, policy)
    tables = decorrelation_tables(label_columns, cfg, policy)
    targets, known = label_targets(label_columns, cfg.attributes, policy)
    weight_scale = float(sample_weights(targets, known, tables).mean()) if tables else 1.0
    stats["decorrelation"] = [{k: t[k] for k in ("pair", "phi", "weights")} for t in tables]
    config = network_config(cfg, stats["age_mean"], stats["age_sd"])
    # each worker gets about n/num_workers rows; a fixed step count per epoch keeps the ranks in lockstep
    steps_per_epoch = int(0.9 * n_train / tc.num_workers) // tc.batch_size
    if steps_per_epoch < 1:
        raise ValueError(f"{n_train} training images are too few for {tc.num_workers} workers x batch "
                         f"{tc.batch_size}: lower classifier.train.batch_size or num_workers")
    resources = {"CPU": tc.cpus_per_worker}
    if tc.use_gpu:
        resources["GPU"] = 1
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"job": job.model_dump(mode="python"), "network_config": config,
                           "pos_weight": stats["pos_weight"], "policy": policy, "steps_per_epoch": steps_per_epoch,
                           "decorrelation": tables, "weight_scale": weight_scale},
        scaling_config=ScalingConfig(num_workers=tc.num_workers, use_gpu=tc.use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(name=tc.run_name, storage_path=storage_path, storage_filesystem=storage_fs,
                             checkpoint_config=CheckpointConfig(num_to_keep=1),
                             failure_config=FailureConfig(max_failures=0)),
        datasets={"train": train_ds},
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"classifier run {tc.run_name} finished without a checkpoint")
    model = AttributeClassifier(config)
    with result.checkpoint.as_directory() as folder:
        state = torch.load(Path(folder) / _STATE_FILE, map_location="cpu", weights_only=False)
    model.load_state_dict(state["model"])
    stats["final_loss"] = float((result.metrics or {}).get("loss", float("nan")))
    stats["steps_per_epoch"] = steps_per_epoch
    return model.eval(), stats
