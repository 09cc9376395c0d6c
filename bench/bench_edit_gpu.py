"""The editing engine at SD v1.5's size on a GPU: counterfactuals per second per method (bf16, PyTorch's SDPA
attention), against plain diffusers doing the same, and whether an image's counterfactual depends on the batch
it was edited in.

No weights can be downloaded, so the model has SD v1.5's architecture (its UNet, a text encoder of CLIP ViT-L/14's
size, the 4-channel VAE) with random weights: the images mean nothing, the cost is the same. It is built here,
saved as a diffusers folder and loaded by `cfgen.models.sd.load_pipeline` in the dtype the generation job's actors
use (`cfgen.pipeline.generate`: bf16 on CUDA). Each method runs through `cfgen.editing.engine.counterfactuals` as
the job calls it (`engine_options` of an `EditConfig`), two edits per image, after a warm-up of the same shapes;
the peers are `bench/peers.py`'s, as in `bench_edit.py`.

    python bench/bench_edit_gpu.py --json $OUT/edit_gpu.json                 # on the GPU machine
    .venv/bin/python bench/bench_edit_gpu.py --shape tiny --n 2 --steps 4    # a smoke run on CPU
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

EDITS = [{"support_devices": 0}, {"smoking": 1}]
#: the methods at the settings the job would use: PRISM's guidance 7.5 for the Prompt-to-Prompt family
METHODS = {
    "ddim": {"method": "ddim", "guidance_scale": 1.0},
    "sdedit": {"method": "sdedit", "strength": 0.6, "guidance_scale": 7.5},
    "ddpm": {"method": "ddpm", "guidance_scale": 7.5},
    "direct": {"method": "direct", "guidance_scale": 7.5},
    "p2p": {"method": "p2p", "guidance_scale": 7.5},
    "null_text": {"method": "null_text", "guidance_scale": 7.5},
}


def options_of(name: str, steps: int, config: str | None = None) -> dict:
    """The engine's settings for `name` in `METHODS`, or for "config": the `edit` section of `config` as the job
    runs it (its own steps; the held attributes' prompts left out)."""
    from cfgen.config import EditConfig, load_config
    from cfgen.editing.engine import engine_options

    if name == "config":
        return engine_options(load_config(config).edit)
    return engine_options(EditConfig(**METHODS[name], num_inference_steps=steps))


def sd15_shaped_pipeline(seed: int = 0):
    """SD v1.5's architecture with random weights, and cfgen's domain tokenizer (77 tokens, as CLIP's)."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from cfgen.models.sd import SD_SCHEDULER
    from cfgen.models.tokenizer import build_domain_tokenizer

    torch.manual_seed(seed)
    tokenizer = build_domain_tokenizer(77)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
        num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), latent_channels=4,
        layers_per_block=2, sample_size=512)
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768)  # the defaults are SD v1.5's blocks
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=DDIMScheduler(**SD_SCHEDULER), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


def tiny_pipeline():
    from cfgen.config import ModelConfig
    from cfgen.models.sd import build_tiny_pipeline

    return build_tiny_pipeline(ModelConfig())


def phantoms(n: int, size: int):
    """`n` phantom CXRs at `size` (uint8), their prompts and the prompts of each of `EDITS`."""
    from cfgen.config import PhantomConfig
    from cfgen.io.prompts import build_prompt, counterfactual_prompt
    from cfgen.phantoms import PhantomSCM

    scm = PhantomSCM(PhantomConfig(n=n, size=size, seed=0))
    subjects = list(scm.subjects(0, n))
    images = np.stack([np.round(scm.render(s, size)[0] * 255).astype(np.uint8) for s in subjects])
    rows = [s.attributes() for s in subjects]
    return images, [build_prompt(r) for r in rows], [[counterfactual_prompt(r, e) for r in rows] for e in EDITS]


def synchronize():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run_method(pipe, name: str, images, factual, cf_prompts, steps: int) -> dict:
    """Warm-up on the same shapes, then one timed call over the whole batch, as a job's actor makes it."""
    import torch

    from cfgen.editing.engine import counterfactuals
    from cfgen.editing.inversion_cache import InversionCache

    options = options_of(name, steps)
    seeds = list(range(len(images)))
    counterfactuals(pipe, images, factual, cf_prompts, seeds=seeds, inversion_cache=InversionCache(),
                    **{**options, "num_inference_steps": 2})
    synchronize()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    result = counterfactuals(pipe, images, factual, cf_prompts, seeds=seeds, inversion_cache=InversionCache(),
                             **options)
    synchronize()
    seconds = time.perf_counter() - started
    n_cf = len(images) * len(cf_prompts)
    finite = all(np.isfinite(np.asarray(c, dtype=np.float32)).all() for c in result.counterfactuals)
    return {"kind": "engine", "method": name, "images": len(images), "edits": len(cf_prompts), "steps": steps,
            "seconds": round(seconds, 3), "counterfactuals_per_s": round(n_cf / seconds, 3),
            "unet_forward": result.unet_forward, "unet_backward": result.unet_backward,
            "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None,
            "finite": bool(finite)}


def batch_dependence(pipe, name: str, images, factual, cf_prompts, steps: int, alone: int) -> dict:
    """The first `alone` images edited one at a time, first in a batch of the same size with the other images in
    reverse order, and alone padded to the batch's size (`cfgen.editing.padding`), against the same images inside
    the whole batch: the largest difference of a counterfactual in grey levels of 255 for each (0 = independent of
    the batch's size / of its other images and their order / of the batch, padded)."""
    from cfgen.editing.engine import counterfactuals
    from cfgen.editing.inversion_cache import InversionCache
    from cfgen.editing.padding import counterfactuals_padded

    options = options_of(name, steps)
    seeds = list(range(len(images)))

    def edit(rows: list[int], pad_to: int | None = None) -> list[np.ndarray]:
        args = (pipe, images[rows], [factual[r] for r in rows], [[p[r] for r in rows] for p in cf_prompts])
        if pad_to:
            return counterfactuals_padded(*args, pad_to, seeds=[seeds[r] for r in rows], **options).counterfactuals
        return counterfactuals(*args, seeds=[seeds[r] for r in rows], inversion_cache=InversionCache(),
                               **options).counterfactuals

    def difference(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max() * 255.0)

    whole = edit(list(range(len(images))))
    worst_alone = worst_others = worst_padded = 0.0
    for i in range(alone):
        one = edit([i])
        others = edit([i] + [j for j in reversed(range(len(images))) if j != i])
        padded = edit([i], pad_to=len(images))
        for e in range(len(cf_prompts)):
            worst_alone = max(worst_alone, difference(whole[e][i], one[e][0]))
            worst_others = max(worst_others, difference(whole[e][i], others[e][0]))
            worst_padded = max(worst_padded, difference(whole[e][i], padded[e][0]))
    return {"kind": "batch_dependence", "method": name, "batch": len(images), "alone": alone, "steps": steps,
            "max_difference_grey_levels": round(worst_alone, 4),
            "same_size_other_order_max_difference_grey_levels": round(worst_others, 4),
            "alone_padded_max_difference_grey_levels": round(worst_padded, 4)}


def rounding_probe(pipe, name: str, images, factual, cf_prompts, steps: int, config: str | None = None,
                   relative: float = 2.0 ** -8) -> dict:
    """What kernels that round differently do to a counterfactual, emulated where they do not (on CPU the engine is
    batch-invariant): every UNet output of a second run scaled by (1 + u x `relative`), u uniform in [-1, 1] per
    element (bf16 keeps 8 bits: 2^-8 is its relative rounding step). The largest and the mean difference, in grey
    levels of 255: how far this model and method carry a rounding difference through the steps."""
    import torch

    from cfgen.editing.engine import counterfactuals
    from cfgen.editing.inversion_cache import InversionCache

    options = options_of(name, steps, config)
    seeds = list(range(len(images)))

    def run():
        return counterfactuals(pipe, images, factual, cf_prompts, seeds=seeds, inversion_cache=InversionCache(),
                               **options).counterfactuals

    exact = run()
    noise = torch.Generator().manual_seed(0)

    def perturb(module, args, output):
        sample = output.sample if hasattr(output, "sample") else output[0]
        u = torch.rand(sample.shape, generator=noise).to(sample.device, sample.dtype) * 2 - 1
        sample.mul_(1 + relative * u)
        return output

    hook = pipe.unet.register_forward_hook(perturb)
    try:
        rounded = run()
    finally:
        hook.remove()
    diffs = [np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)) * 255.0
             for a, b in zip(exact, rounded)]
    return {"kind": "rounding_probe", "method": name, "steps": options["num_inference_steps"],
            "guidance": options["guidance_scale"], "relative": relative,
            "max_difference_grey_levels": round(max(float(d.max()) for d in diffs), 3),
            "mean_difference_grey_levels": round(float(np.mean([d.mean() for d in diffs])), 4)}


def peer_rows(pipe, images, factual, cf_prompts, steps: int, batch: int) -> list[dict]:
    """The engine (edits only, no null edit, as the peer) against plain diffusers, each after a warm-up."""
    import peers

    from cfgen.config import EditConfig

    seeds = list(range(len(images)))
    parties = {
        "sdedit": (lambda: peers.sdedit_img2img(pipe, images, cf_prompts, 0.6, steps, 7.5, seeds, batch)),
        "ddim": (lambda: peers.ddim_inverse_then_generate(pipe, images, factual, cf_prompts, steps, 1.0, batch)),
    }
    rows = []
    for name, peer in parties.items():
        edit = EditConfig(**METHODS[name], num_inference_steps=steps)

        def engine():
            return peers.engine_edits(pipe, images, factual, cf_prompts, edit, seeds, batch)

        timings = {}
        for party, run in (("engine", engine), ("peer", peer)):
            run()
            synchronize()
            started = time.perf_counter()
            run()
            synchronize()
            timings[party] = len(images) * len(cf_prompts) / (time.perf_counter() - started)
        rows.append({"kind": "peer", "method": name, "engine_images_per_s": round(timings["engine"], 3),
                     "peer_images_per_s": round(timings["peer"], 3),
                     "ratio": round(timings["engine"] / timings["peer"], 3)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--shape", choices=["sd15", "tiny"], default="sd15")
    parser.add_argument("--n", type=int, default=16, help="images per batch")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--methods", nargs="*", default=list(METHODS))
    parser.add_argument("--alone", type=int, default=2, help="images edited alone for the batch-dependence check")
    parser.add_argument("--dtype", choices=["auto", "bf16", "fp32"], default="auto",
                        help="auto: bf16 on CUDA, fp32 on CPU, as the generation job's actors load the model")
    parser.add_argument("--no-peers", action="store_true")
    parser.add_argument("--model", help="a diffusers folder to load instead of building --shape with random weights")
    parser.add_argument("--batch-check", nargs="*", default=[], metavar="METHOD",
                        help="only the batch-dependence check (batch_dependence), for these methods")
    parser.add_argument("--probe", nargs="*", default=[], metavar="METHOD",
                        help="only the rounding probe (rounding_probe), for these methods ('config': --config's)")
    parser.add_argument("--config", help="a job config whose edit section is the method 'config'")
    parser.add_argument("--relative", type=float, default=2.0 ** -8,
                        help="the probe's rounding step (2^-8 bf16, 2^-11 TF32, 2^-24 fp32)")
    parser.add_argument("--json", default=str(ROOT / "bench" / "results" / "edit_gpu.json"))
    args = parser.parse_args()

    import torch

    from cfgen.models.sd import load_pipeline, pick_device, save_pipeline, vae_scale_factor

    device = pick_device("auto")
    bf16 = args.dtype == "bf16" or (args.dtype == "auto" and device.type == "cuda")
    dtype = torch.bfloat16 if bf16 else torch.float32
    started = time.perf_counter()
    if args.model:
        loaded = time.perf_counter()
        pipe = load_pipeline(args.model, device=device, dtype=dtype)
        load_seconds = time.perf_counter() - loaded
    else:
        built = sd15_shaped_pipeline() if args.shape == "sd15" else tiny_pipeline()
        with tempfile.TemporaryDirectory() as folder:
            save_pipeline(built, folder)
            del built
            loaded = time.perf_counter()
            pipe = load_pipeline(folder, device=device, dtype=dtype)
            load_seconds = time.perf_counter() - loaded
    size = pipe.unet.config.sample_size * vae_scale_factor(pipe.vae)
    images, factual, cf_prompts = phantoms(args.n, size)
    processors = sorted({type(p).__name__ for p in pipe.unet.attn_processors.values()})
    header = {"kind": "setup", "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "dtype": str(dtype), "model": args.model or f"{args.shape}, random weights", "resolution": size,
              "unet_parameters_m": round(sum(p.numel() for p in pipe.unet.parameters()) / 1e6, 1),
              "attention_processors": processors, "build_and_save_s": round(loaded - started, 1),
              "load_s": round(load_seconds, 1), "torch": torch.__version__}
    print(json.dumps(header), flush=True)
    rows = [header]

    def save():
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")

    if args.batch_check:
        for name in args.batch_check:
            rows.append(batch_dependence(pipe, name, images, factual, cf_prompts, args.steps, args.alone))
            print(json.dumps(rows[-1]), flush=True)
            save()
        return
    if args.probe:
        for name in args.probe:
            rows.append(rounding_probe(pipe, name, images, factual, cf_prompts, args.steps, args.config,
                                       args.relative))
            print(json.dumps(rows[-1]), flush=True)
            save()
        return
    for name in ("ddim", "ddpm"):  # first: the cheap correctness check, before null-text's long timing
        if name in args.methods and args.alone:
            row = batch_dependence(pipe, name, images, factual, cf_prompts, args.steps, args.alone)
            print(json.dumps(row), flush=True)
            rows.append(row)
            save()
    for name in args.methods:
        try:
            row = run_method(pipe, name, images, factual, cf_prompts, args.steps)
        except Exception as error:  # one method's failure is a row, not the end of the run
            row = {"kind": "engine", "method": name, "error": f"{type(error).__name__}: {error}"}
        print(json.dumps(row), flush=True)
        rows.append(row)
        save()
    if not args.no_peers:
        for row in peer_rows(pipe, images, factual, cf_prompts, args.steps, args.n):
            print(json.dumps(row), flush=True)
            rows.append(row)
            save()


if __name__ == "__main__":
    main()
