"""A miniature `cfgen demo`: phantoms -> ingest -> tiny SD + DeepSpeed ZeRO-2 on 2 workers -> counterfactuals."""

import json
import math

import numpy as np
import pandas as pd
import pytest

from cfgen.config import load_config

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def test_miniature_demo_end_to_end(ray_local, tmp_path):
    from cfgen.pipeline.workflows import run_demo

    job = load_config("configs/demo.yaml", [
        f"output_uri={tmp_path}/run", f"tracking.tracking_uri=sqlite:///{tmp_path}/mlflow.db",
        "phantoms.n=160", "train.max_steps=8", "train.checkpoint_every=4", "train.batch_size=8",
        "train.num_workers=2", "train.cpus_per_worker=1",  # the demo trains on one worker; two here, so the
        # miniature also runs DeepSpeed's data-parallel path
        "train.vae.steps=20", "train.vae.finish_steps=2", "edit.limit=6", "edit.num_inference_steps=4",
        "edit.batch_size=3",
        "classifier.train.epochs=1", "classifier.train.batch_size=16", "classifier.bootstrap=20",
    ])
    out = run_demo(job)

    html = (tmp_path / "run" / "report.html").read_text()
    assert out["report"].endswith("report.html")
    assert "support_devices=0" in html and "smoking=1" in html and "data:image/png;base64," in html

    results = pd.read_parquet(tmp_path / "run" / "generate" / "results")
    assert len(results) == 6 * 2
    assert set(results["edit_name"]) == {"support_devices=0", "smoking=1"}
    for column in ("cf_error_l1", "identity_error_l1", "l1_factual_counterfactual", "reconstruction_l1",
                   "autoencoder_l1"):
        # a row whose prompt cannot say its edit is not edited: no error against a truth it was not edited toward
        assert (results[column].between(0, 1) | results["edit_applied"].isna()).all(), column
        assert results.loc[results["edit_applied"].notna(), column].notna().all(), column
    assert (results["split"] == "test").all()
    # captions name only what is present: removing a device drops its phrase; a row whose device is not known
    # cannot say the edit and is left unedited, saying why
    removal = results[results.edit_name == "support_devices=0"]
    assert not removal["counterfactual_prompt"].str.contains("support devices").any()
    had = removal[removal["support_devices"] == 1]
    assert had["prompt"].str.contains("support devices").all()
    unknown = removal[removal["support_devices"].isna()]
    assert unknown["edit_error"].notna().all() and unknown["edit_applied"].isna().all()
    smoking = results[(results.edit_name == "smoking=1") & results["smoking"].notna()]
    assert len(smoking) and smoking["counterfactual_prompt"].str.contains(", smoker").all()
    # the demo's method (configs/demo.yaml: directed edit-friendly DDPM from the first step, a sweep of 3 scales)
    # at 4 steps: 4 steps of inversion with the factual prompt, then per edit and scale 4 sampled steps of two rows
    # each (the edited prompt and the factual one, whose difference is the edit's direction), and no UNet call for
    # the exact null edit; the classifier kept one scale per row, and the row says which
    assert (results["method"] == "ddpm").all()
    assert (results["unet_evaluations"] == 4 + 3 * 2 * 2 * 4).all()
    assert {json.loads(s)["edit_guidance"] for s in results["edit_setting"]} <= {1.5, 2.0, 3.0}

    # the metric stage: the classifier read every row, and the report shows the instrument
    assert "Attribute classifier" in html and "clf_flip_rate" in html and "Instrument calibration" in html
    edited = results[results["edit_applied"].notna()]
    assert edited["metric_error"].isna().all() and len(edited) >= 8
    assert results.loc[results["edit_applied"].isna(), "metric_error"].str.startswith("edit_not_applied").all()
    for column in ("clf_target_before", "clf_target_after", "p_after__pleural_effusion", "null_ssim"):
        assert edited[column].notna().all(), column
    assert edited[["clf_target_before", "clf_target_after"]].stack().between(0, 1).all()
    assert np.asarray(edited["counterfactual_features"].iloc[0]).shape[0] > 16
    devices = edited[edited.edit_name == "support_devices=0"]  # the phantom's truth says who has a device
    assert ((devices["clf_needs_change"] == 1) == (devices["factual_state"] == 1)).all()

    # MLflow: params, a loss curve, the pipeline as an artifact, a registered version behind the alias
    import mlflow

    mlflow.set_tracking_uri(job.tracking.tracking_uri)
    client = mlflow.tracking.MlflowClient()
    run = client.get_run(out["MLflow run"].split()[0])
    assert run.data.params["train.zero_stage"] == "2"
    assert '"stage": 2' in run.data.params["deepspeed_config"]
    losses = client.get_metric_history(run.info.run_id, "loss")
    assert len(losses) == 8 and all(math.isfinite(m.value) for m in losses)
    version = client.get_model_version_by_alias("cfgen-sd", "champion")
    assert version.run_id == run.info.run_id
    from cfgen.classify.store import load_classifier

    assert int(client.get_model_version_by_alias("cfgen-classifier", "champion").version) == 1
    registered = load_classifier("models:/cfgen-classifier@champion", tracking=job.tracking)
    assert registered.attributes == job.classifier.attributes

    # the registered model resolves and loads with from_pretrained; fine-tuning changed the UNet
    from cfgen.models.sd import load_pipeline
    from cfgen.tracking.runs import download_model

    local = download_model(job.tracking, "models:/cfgen-sd@champion", str(tmp_path / "dl"))
    tuned, base = load_pipeline(local), load_pipeline(str(tmp_path / "run" / "models" / "base"))
    w_tuned = tuned.unet.conv_in.weight.detach().numpy()
    w_base = base.unet.conv_in.weight.detach().numpy()
    assert not np.allclose(w_tuned, w_base)
    assert np.array_equal(tuned.vae.encoder.conv_in.weight.detach().numpy(),
                          base.vae.encoder.conv_in.weight.detach().numpy())  # the VAE stayed frozen

    # rerunning the demo on the same output resumes: nothing is regenerated
    again = run_demo(job)
    assert again["counterfactual rows"] == 0

    # `cfgen generate` on the registered model, by alias, into another output
    from cfgen.pipeline.workflows import run_generate

    other = job.model_copy(deep=True, update={"output_uri": str(tmp_path / "gen2")})
    other.edit.limit = 2
    other.data.manifest_uri = str(tmp_path / "run" / "phantoms" / "manifest.parquet")
    generated = run_generate(other, "models:/cfgen-sd@champion", str(tmp_path / "run" / "ingest" / "decoded"))
    assert generated.rows_written == 2 * 2
    rows = pd.read_parquet(generated.results_uri)
    assert rows["model_uri"].str.contains("registry").all()
    assert rows.loc[rows["edit_applied"].notna(), "cf_error_l1"].notna().sum() >= 2
