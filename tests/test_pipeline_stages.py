"""The Ray Data stage callables, exercised as plain functions on pandas/numpy batches (no Ray)."""

import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from cfgen.config import DataConfig, DecodeConfig, PhantomConfig, StorageConfig
from cfgen.pipeline.data import DecodeStage, tensor_column, typed_table
from cfgen.pipeline.generate import MeasureStage, edit_name
from cfgen.phantoms.writers import write_phantoms


def _phantom_rows(tmp_path, n=3):
    cfg = PhantomConfig(n=n, size=64, seed=3, formats=["dicom"], missing_fraction=0.0)
    write_phantoms(cfg, str(tmp_path / "ph"))
    return cfg, pd.read_parquet(tmp_path / "ph" / "manifest.parquet")


def test_decode_stage_keeps_every_row_and_names_each_failure(tmp_path):
    cfg, rows = _phantom_rows(tmp_path)
    (tmp_path / "corrupt.dcm").write_bytes(b"DICM" + b"\x00" * 50)
    bad = pd.DataFrame({"image_id": ["corrupt", "gone"], "image_uri": [str(tmp_path / "corrupt.dcm"),
                                                                      str(tmp_path / "missing.dcm")]})
    batch = pd.concat([rows, bad], ignore_index=True)
    table = DecodeStage(DataConfig(decode=DecodeConfig(size=64)), StorageConfig())(batch)
    out, images = table.drop_columns(["image"]).to_pydict(), tensor_column(table, "image")
    assert table.num_rows == len(batch)
    assert out["status"] == ["ok"] * 3 + ["error", "error"]
    assert out["error_stage"][3] == "decode" and out["error_reason"][3]
    assert out["error_stage"][4] == "read" and out["error_reason"][4].startswith("missing_object")
    assert out["error_stage"][0] is None and table.schema.field("error_stage").type == pa.string()
    assert images.shape == (5, 64, 64) and images.dtype == np.uint8
    assert images[0].max() > 100  # a decoded phantom, not the zero placeholder
    assert not images[3].any()
    assert out["prompt"][0].startswith("a chest x-ray of a ")

    typed = DecodeStage(DataConfig(decode=DecodeConfig(size=64)), StorageConfig())(pa.Table.from_pandas(rows))
    assert typed.schema.field("phantom_index").type == pa.int64()  # Arrow input types survive the stage


def test_decoded_phantom_matches_its_rendering(tmp_path):
    """Decoding the written DICOM gives back the rendered image: the true counterfactuals are comparable."""
    from cfgen.phantoms.scm import PhantomSCM

    cfg, rows = _phantom_rows(tmp_path, n=4)
    images = tensor_column(DecodeStage(DataConfig(decode=DecodeConfig(size=64)), StorageConfig())(rows), "image")
    scm = PhantomSCM(cfg)
    for i, index in enumerate(rows["phantom_index"]):
        rendered, _ = scm.render(scm.subject(int(index)))
        assert np.abs(images[i] / 255.0 - rendered).max() < 2.5 / 255


def test_measure_stage_scores_a_perfect_counterfactual_as_zero_error(tmp_path):
    cfg, rows = _phantom_rows(tmp_path, n=2)
    stage = MeasureStage(str(tmp_path / "gen"), StorageConfig(), DecodeConfig(size=64), phantoms=cfg)
    edit = {"support_devices": 1}
    base = {k: rows[k].to_numpy() for k in ("image_id", "phantom_index")}
    truth = [stage.truth({"phantom_index": i, "edit": json.dumps(edit)})[0] for i in base["phantom_index"]]
    factual = np.stack([stage.truth({"phantom_index": i, "edit": "{}"})[0] for i in base["phantom_index"]])
    batch = {
        **base,
        "key": np.array(["k0", "k1"], dtype=object),
        "seed": np.array([0, 0]),
        "method": np.array(["ddpm", "ddpm"], dtype=object),
        "failure_reason": np.array([None, None], dtype=object),
        "edit": np.array([json.dumps(edit)] * 2, dtype=object),
        "edit_name": np.array([edit_name(edit)] * 2, dtype=object),
        "image": (factual * 255).round().astype(np.uint8),
        "counterfactual": (np.stack(truth) * 255).round().astype(np.uint8),
        "reconstruction": (factual * 255).round().astype(np.uint8),
        "autoencoded": (factual * 255).round().astype(np.uint8),
    }
    out = stage(typed_table(batch)).to_pydict()
    assert np.allclose(out["cf_error_l1"], 0, atol=1e-6)
    assert np.allclose(out["reconstruction_l1"], 0, atol=1e-6)
    assert np.allclose(out["autoencoder_l1"], 0, atol=1e-6)
    assert np.allclose(out["effect_ratio"], 1.0)  # the counterfactual is the truth
    assert np.all(np.array(out["l1_factual_counterfactual"]) > 0)  # adding a device changes pixels
    assert set(out) >= {"counterfactual_uri", "panel_uri"} and "image" not in out
    assert out["edit_changes_truth"] == [1.0, 1.0]  # neither subject had a device
    null_edit = {**{k: v[:1] for k, v in batch.items()}, "edit": np.array(['{"support_devices": 0}'], dtype=object)}
    assert stage(typed_table(null_edit)).to_pydict()["edit_changes_truth"] == [0.0]
    assert (tmp_path / "gen" / "panels").exists()
    written = sorted(f.name for f in (tmp_path / "gen" / "images").iterdir())
    assert written == ["PH000000__factual.png", "PH000000__support_devices-1__ddpm__s0.png", "PH000001__factual.png",
                       "PH000001__support_devices-1__ddpm__s0.png"]  # the counterfactuals and the images they edit
    from PIL import Image

    factual_png = np.asarray(Image.open(out["factual_uri"][0]))
    assert np.array_equal(factual_png, batch["image"][0])  # discovery subtracts exactly what the engine edited


def test_edit_names_are_stable():
    assert edit_name({"support_devices": 0}) == "support_devices=0"
    assert edit_name({"b": 1, "a": 0}) == "a=0,b=1"


def test_report_summary_scores_only_edits_that_change_the_truth():
    from cfgen.report.html import summarize

    results = pd.DataFrame({
        "edit_name": ["a=1"] * 4,
        "edit_changes_truth": [1.0, 1.0, 0.0, 0.0],
        "cf_error_l1": [0.1, 0.3, 0.9, 0.9],
        "identity_error_l1": [0.2, 0.2, 0.0, 0.0],
    })
    row = summarize(results).iloc[0]
    assert (row["rows"], row["rows_changing_truth"]) == (4, 2)
    assert row["cf_error_l1"] == pytest.approx(0.2)
    assert row["cf_beats_identity"] == pytest.approx(0.5)


def test_load_manifest_assigns_patient_level_splits(tmp_path):
    from cfgen.config import JobConfig
    from cfgen.io.splits import assert_no_patient_leak
    from cfgen.pipeline.data import load_manifest

    rows = pd.DataFrame({
        "image_id": [f"img{i}" for i in range(300)],
        "image_uri": [f"/data/img{i}.png" for i in range(300)],
        "patient_id": [f"p{i // 3}" for i in range(300)],  # three images per patient
        "split": ["test"] * 3 + [""] * 297,  # one patient already has an official split
    })
    rows.to_csv(tmp_path / "m.csv", index=False)
    job = JobConfig.model_validate({"data": {"manifest_uri": str(tmp_path / "m.csv"),
                                             "split_fractions": {"train": 0.7, "test": 0.3}}})
    ok, errors, n = load_manifest(job)
    assert (len(ok), len(errors), n) == (300, 0, 300)
    assert set(ok["split"]) == {"train", "test"}
    assert (ok.loc[ok.patient_id == "p0", "split"] == "test").all()
    assert_no_patient_leak(ok)
    assert 0.55 < (ok["split"] == "train").mean() < 0.85


def test_effect_ratio_measures_how_much_of_the_true_change_an_edit_makes():
    from cfgen.metrics.image import effect_ratio

    factual = np.zeros((8, 8), np.float32)
    truth = factual.copy()
    truth[:2, :2] = 0.8
    assert effect_ratio(factual, truth, truth) == pytest.approx(1.0)
    assert effect_ratio(factual, factual, truth) == pytest.approx(0.0)
    assert effect_ratio(factual, truth / 2, truth) == pytest.approx(0.5)
    assert np.isnan(effect_ratio(factual, truth, factual))  # a null edit has no true effect to reach


def test_measure_stage_reads_each_row_with_the_classifier_and_names_what_it_cannot_score(tmp_path):
    """The metric stage as a plain callable: classifier columns for a scorable edit, NaN and a reason for an edit
    of an attribute the classifier has no head for, and the image metrics for both."""
    import torch

    from cfgen.classify.network import AttributeClassifier, network_config
    from cfgen.classify.store import save_classifier
    from cfgen.config import ClassifierConfig

    torch.manual_seed(0)
    clf_cfg = ClassifierConfig(attributes=["support_devices", "sex"], init_features=8, growth_rate=4,
                               block_config=[2, 2], image_size=32)
    save_classifier(AttributeClassifier(network_config(clf_cfg)), str(tmp_path / "clf"))
    cfg, rows = _phantom_rows(tmp_path, n=2)
    stage = MeasureStage(str(tmp_path / "gen"), StorageConfig(), DecodeConfig(size=64), phantoms=cfg,
                         classifier_uri=str(tmp_path / "clf"))
    edits = [{"support_devices": 1}, {"cardiomegaly": 1}]
    index = rows["phantom_index"].to_numpy()
    factual = np.stack([stage.truth({"phantom_index": i, "edit": "{}"})[0] for i in index])
    truth = np.stack([stage.truth({"phantom_index": i, "edit": json.dumps(e)})[0] for i, e in zip(index, edits)])
    u8 = lambda x: (x * 255).round().astype(np.uint8)  # noqa: E731
    batch = {"image_id": rows["image_id"].to_numpy(), "phantom_index": index,
             "edit": np.array([json.dumps(e) for e in edits], dtype=object),
             "edit_name": np.array([edit_name(e) for e in edits], dtype=object),
             "image": u8(factual), "counterfactual": u8(truth), "reconstruction": u8(factual),
             "autoencoded": u8(factual)}
    out = stage(typed_table(batch)).to_pydict()
    assert out["metric_error"][0] is None and out["metric_error"][1].startswith("unscorable_edit")
    assert 0 < out["clf_target_after"][0] < 1
    assert out["clf_target_after"][1] is None  # NaN is written as a Parquet null
    assert out["factual_state"][0] == 0.0  # the phantom had no device: the edit needs a change
    assert out["clf_needs_change"][0] == 1.0
    assert len(out["counterfactual_features"][0]) == len(out["factual_features"][0]) > 8
    assert out["null_ssim"] == pytest.approx([1.0, 1.0])
    assert out["l1_outside_region"][0] < 1e-6  # the true counterfactual changes nothing outside its region
    assert np.isfinite(out["p_after__sex"]).all()


def _units(job, decoded):
    from cfgen.pipeline.plan import batch_units

    return batch_units(job, decoded.drop_columns(["image"]).to_pandas())


def test_counterfactual_stage_confines_each_edit_to_the_rows_lung_mask(tmp_path):
    """The editing stage as a plain callable on a phantom batch: with `edit.confine: mask` every counterfactual
    equals the input outside its (grown) lung mask, and a row without a mask is edited everywhere and says so."""
    from cfgen.config import JobConfig, ModelConfig
    from cfgen.models.sd import build_tiny_pipeline, save_pipeline
    from cfgen.pipeline.generate import CounterfactualStage

    save_pipeline(build_tiny_pipeline(ModelConfig(), seed=0), str(tmp_path / "sd"))
    cfg, rows = _phantom_rows(tmp_path, n=3)
    decoded = DecodeStage(DataConfig(decode=DecodeConfig(size=64)), StorageConfig())(rows)
    decoded = decoded.set_column(decoded.schema.get_field_index("mask_uri"), "mask_uri",
                                 pa.array(list(rows["mask_uri"][:2]) + [None], pa.string()))
    job = JobConfig.model_validate({"edit": {"num_inference_steps": 2, "confine": "mask", "mask_dilation": 1,
                                             "edits": [{"support_devices": 0}]}})
    out = CounterfactualStage(str(tmp_path / "sd"), job.model_dump(mode="python"), _units(job, decoded))(decoded)
    images, cfs = tensor_column(out, "image"), tensor_column(out, "counterfactual")
    confined = out["confined"].to_pylist()
    assert confined == [True, True, False]
    from scipy.ndimage import binary_dilation
    from PIL import Image

    for i in range(2):
        lungs = np.asarray(Image.open(rows["mask_uri"][i])) > 127
        outside = ~binary_dilation(lungs, iterations=1)
        assert outside.any() and np.array_equal(cfs[i][outside], images[i][outside])
    assert out["method"].to_pylist() == ["ddim"] * 3
    assert out["edit_setting"].to_pylist() == ["{}"] * 3  # no sweep to choose from
    assert out["unet_evaluations"].to_pylist() == [(1 + 1 + 1) * 2] * 3


@pytest.mark.parametrize("method", ["p2p", "direct", "ddpm"])
def test_counterfactual_stage_lets_the_classifier_choose_each_rows_sweep_setting_and_writes_it(tmp_path, method):
    """A sweep with a classifier (self-replace settings; ddpm: direction scales): the stage loads it once, the
    engine asks it for every edit of the batch, and every row says which setting won."""
    import torch

    from cfgen.classify.network import AttributeClassifier, network_config
    from cfgen.classify.store import save_classifier
    from cfgen.config import ClassifierConfig, JobConfig, ModelConfig
    from cfgen.models.sd import build_tiny_pipeline, save_pipeline
    from cfgen.pipeline.generate import CounterfactualStage

    torch.manual_seed(0)
    save_classifier(AttributeClassifier(network_config(ClassifierConfig(
        attributes=["support_devices", "pleural_effusion"], init_features=8, growth_rate=4, block_config=[2, 2],
        image_size=32))), str(tmp_path / "clf"))
    save_pipeline(build_tiny_pipeline(ModelConfig(), seed=0), str(tmp_path / "sd"))
    _, rows = _phantom_rows(tmp_path, n=2)
    decoded = DecodeStage(DataConfig(decode=DecodeConfig(size=64)), StorageConfig())(rows)
    edits = [{"support_devices": 0}, {"pleural_effusion": 1}]
    key, values, least = ("edit_guidance", (1.5, 3.0), 1.5) if method == "ddpm" else ("self_replace", (0.4, 0.8), 0.8)
    sweep = {"edit_guidance": list(values), "edit_threshold": 0.5} if method == "ddpm" else {"self_replace": list(values)}
    job = JobConfig.model_validate({"edit": {"method": method, "num_inference_steps": 2, **sweep, "edits": edits}})
    stage = CounterfactualStage(str(tmp_path / "sd"), job.model_dump(mode="python"), _units(job, decoded),
                                classifier_uri=str(tmp_path / "clf"))
    asked, real = [], stage._select

    def spy(config):
        select = real(config)
        return lambda candidates, image, e: asked.append((len(candidates), e)) or select(candidates, image, e)

    stage._select = spy
    out = stage(decoded)
    assert asked == [(2, 0), (2, 1)]
    settings = [json.loads(s) for s in out["edit_setting"].to_pylist()]
    assert len(settings) == 4 and all(set(s) == {key} and s[key] in values for s in settings)
    assert out["method"].to_pylist() == [method] * 4
    plain = CounterfactualStage(str(tmp_path / "sd"), job.model_dump(mode="python"), _units(job, decoded))
    assert plain._select(job.edit) is None  # no classifier: the engine's default, the most preserving setting
    assert [json.loads(s) for s in plain(decoded)["edit_setting"].to_pylist()] == [{key: least}] * 4
