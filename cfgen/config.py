"""One typed configuration for every cfgen job.

The same pydantic model is read by the CLI, the `jobs/` scripts, Ray Serve, the benchmarks and the tests, so a YAML
file that works for one works for all. Each job reads the sections it needs; unknown keys are errors, so a typo in a
config fails before a cluster is paid for.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

#: Attributes the phantom SCM renders, and the default attributes prompts describe.
PHANTOM_ATTRIBUTES = ("sex", "age", "smoking", "support_devices", "pleural_effusion", "cardiomegaly")


def _normalize_edits(edits: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Edits as the engine reads them. A shift of age is the text "+10" / "-5", or in YAML {age: {shift: 10}}:
    YAML reads an unquoted +10 as the number 10, an absolute age, so the mapping form is the safe one to write."""
    out = []
    for edit in edits:
        if not isinstance(edit, dict) or not edit:
            raise ValueError(f"an edit is a non-empty mapping attribute -> value, got {edit!r}")
        clean = {}
        for name, value in edit.items():
            if isinstance(value, dict):
                if set(value) != {"shift"} or isinstance(value["shift"], bool) \
                        or not isinstance(value["shift"], (int, float)):
                    raise ValueError(f"edit {name}={value!r}: a relative edit is {{shift: <signed number>}}")
                if name != "age":
                    raise ValueError(f"edit {name}={value!r}: only age can be shifted")
                value = f"{value['shift']:+g}"
            clean[name] = value
        out.append(clean)
    return out


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class StorageConfig(_Section):
    """How to reach object storage. Credentials come from here or from the environment and are never logged."""

    endpoint_url: str | None = Field(None, description="S3-compatible endpoint, e.g. http://127.0.0.1:9000 (MinIO)")
    region: str | None = None
    anon: bool = False
    aws_access_key_id: SecretStr | None = None
    aws_secret_access_key: SecretStr | None = None
    aws_session_token: SecretStr | None = None
    retries: int = Field(5, ge=0, description="attempts for transient storage errors")


class PhantomEffects(_Section):
    """Strengths of the planted causal effects (0 switches an effect off)."""

    smoking_lung_shift: float = Field(0.08, description="hidden: added to lung intensity of smokers (0..1 scale)")
    device_contrast: float = Field(0.9, description="brightness of the pacemaker box and lead")
    effusion_height: float = Field(0.25, description="fraction of the lung height filled by pleural fluid")
    cardiomegaly_scale: float = Field(1.35, description="heart width multiplier when cardiomegaly is present")
    age_lung_shrink: float = Field(0.10, description="relative lung height lost from age 20 to 90")


class PhantomPrevalence(_Section):
    smoking: float = Field(0.3, ge=0, le=1)
    support_devices: float = Field(0.25, ge=0, le=1)
    pleural_effusion: float = Field(0.25, ge=0, le=1)
    cardiomegaly: float = Field(0.2, ge=0, le=1)


class PhantomConfig(_Section):
    """The phantom CXR data set (DESIGN.md §3)."""

    n: int = Field(2000, ge=1, description="number of subjects (one frontal image each)")
    size: int = Field(64, ge=64, le=512)
    seed: int = 0
    formats: list[Literal["dicom", "png"]] = ["dicom"]
    effects: PhantomEffects = PhantomEffects()
    prevalence: PhantomPrevalence = PhantomPrevalence()
    confounding: float = Field(0.6, ge=0, le=1, description="P(support_devices copies pleural_effusion)")
    missing_fraction: float = Field(0.1, ge=0, le=1, description="fraction of metadata cells left empty")
    monochrome1_fraction: float = Field(0.5, ge=0, le=1)
    png_bit_depth: Literal[8, 16] = Field(16, description="bit depth of phantom PNG images (masks are always 8-bit)")
    split_fractions: dict[str, float] = {"train": 0.8, "validate": 0.1, "test": 0.1}


class DecodeConfig(_Section):
    """Pixels to a fixed-size grayscale array."""

    size: int = Field(64, ge=8, le=4096)
    resize_mode: Literal["pad", "crop"] = "pad"
    dtype: Literal["uint8", "uint16"] = "uint8"
    apply_voi: bool = Field(True, description="apply VOI LUT / window from the file when present")


class PromptConfig(_Section):
    """Metadata to text. A model is trained on one template version: changing it needs retraining."""

    template_version: str = "v1"
    attributes: list[str] = list(PHANTOM_ATTRIBUTES)
    uncertain: Literal["omit", "positive", "negative", "uncertain"] = Field(
        "omit", description="policy for CheXpert's -1 labels"
    )
    negatives: Literal["state", "omit"] = Field(
        "state", description="'state' writes 'without X' for a known negative so edits stay token-aligned"
    )


class DataConfig(_Section):
    manifest_uri: str | None = Field(None, description="CSV or Parquet manifest (see cfgen.io.manifest)")
    manifest_format: Literal["cfgen", "chexpert", "mimic"] = "cfgen"
    image_root: str | None = Field(None, description="prefix for relative image paths in the manifest")
    patients_uri: str | None = Field(None, description="MIMIC-IV patients.csv(.gz): age and sex for MIMIC-CXR")
    labeler: Literal["chexpert", "negbio"] = Field("chexpert", description="which MIMIC-CXR label table to use")
    view_positions: list[str] | None = None
    splits: list[str] | None = None
    split_fractions: dict[str, float] | None = Field(
        None, description="assign splits per patient (hash of patient_id) to rows the manifest leaves unsplit"
    )
    split_seed: int = 0
    limit: int | None = Field(None, ge=1)
    decode: DecodeConfig = DecodeConfig()
    prompt: PromptConfig = PromptConfig()
    read_concurrency: int = Field(8, ge=1)

    @field_validator("manifest_uri", "image_root", "patients_uri")
    @classmethod
    def _local_paths(cls, v: str | None) -> str | None:
        return None if v is None else _absolute(v)


class TinyModelConfig(_Section):
    """Sizes of the tiny SD pipeline built offline for CPU runs and tests."""

    unet_channels: list[int] = [32, 64]
    vae_channels: list[int] = Field([16, 32, 32], description="3 blocks: latents at 1/4 of the image size")
    latent_channels: int = Field(16, ge=1, description="16 x (1/4 x 1/4) = as many latent numbers as grey pixels: "
                                 "a 4-channel latent cannot keep ribs and leads (issue 16); the UNet's cost is "
                                 "set by the latent's size, not its channels")
    vae_attention: bool = Field(False, description="self-attention in the VAE's mid block (SD has one; on 16x16 "
                                "latents it only slows the fit)")
    text_hidden: int = 32
    text_layers: int = 2
    cross_attention_dim: int = 32
    max_text_length: int = 77


class ModelConfig(_Section):
    pretrained: str | None = Field(
        None, description="diffusers pipeline: local dir, s3:// folder or hub id; None builds the tiny model"
    )
    tiny: TinyModelConfig = TinyModelConfig()
    resolution: int = Field(64, ge=32, le=1024)
    device: Literal["auto", "cpu", "cuda"] = "auto"

    @field_validator("pretrained")
    @classmethod
    def _local_folder(cls, v: str | None) -> str | None:
        # a hub id ("org/name") stays as it is; an existing local folder is made absolute
        return _absolute(v) if v and Path(v.removeprefix("file://")).exists() else v

    @field_validator("resolution")
    @classmethod
    def _multiple_of_8(cls, v: int) -> int:
        if v % 8:
            raise ValueError("resolution must be a multiple of 8 (the VAE downsamples by 8 at most)")
        return v


class VAEPretrainConfig(_Section):
    """The tiny VAE's fit to the data: a random VAE reconstructs nothing, which makes every edit noise. The fit is
    cached in object storage by its inputs (architecture, these settings, the fit images), so it runs once."""

    steps: int = Field(300, ge=0)
    batch_size: int = 32
    lr: float = Field(1e-3, gt=0, description="peak of a one-cycle schedule")
    kl_weight: float = 1e-6
    loss: Literal["l1_mse", "mse"] = Field("l1_mse", description="L1 keeps edges (ribs, leads, the meniscus) "
                                           "sharper than MSE alone, which averages them away")
    deterministic: bool = Field(True, description="decode the posterior mean while fitting (the engine encodes "
                                "with the mean too); sampling adds noise the decoder must first learn to ignore")
    crop: int | None = Field(None, ge=8, description="fit on random square crops of this many pixels (a multiple of "
                             "4): the VAE is convolutional, so a step on crops of half the side costs about a "
                             "quarter and the same CPU time buys more steps; None: whole images")
    finish_steps: int | None = Field(
        None, ge=0,
        description="after a crop fit, this many steps on whole images at a tenth of the peak rate, decaying to 0: "
                    "GroupNorm's statistics over a crop are not those over a whole image, and a fit on crops alone "
                    "decodes whole images with a global intensity offset (bench/RESULTS.md); None: none")
    images: int = Field(2048, ge=8, description="training images the fit draws from")
    heldout: int = Field(128, ge=0, description="validate-split images its fidelity is reported on")
    cache_uri: str | None = Field(None, description="where fitted VAEs are kept (local dir or s3://); default: "
                                  "'vae-cache' beside output_uri")


class TrainConfig(_Section):
    num_workers: int = Field(2, ge=1)
    use_gpu: bool = False
    strategy: Literal["deepspeed", "ddp"] = "deepspeed"
    zero_stage: Literal[0, 1, 2, 3] = 2
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    lr: float = 1e-4
    batch_size: int = Field(16, ge=1, description="per worker")
    gradient_accumulation: int = Field(1, ge=1)
    gradient_clipping: float = 1.0
    max_steps: int = Field(200, ge=1)
    prompt_dropout: float = Field(0.1, ge=0, le=1, description="empty prompt rate, for classifier-free guidance")
    snr_gamma: float | None = Field(None, gt=0, description="Min-SNR-gamma loss weighting (Hang et al. 2023; 5 in "
                                    "the paper): down-weights the nearly clean timesteps, whose loss is the fine "
                                    "noise, towards the noisier ones where the prompt decides the image; off: "
                                    "plain MSE")
    cache_latents: bool = Field(True, description="encode the training images with the frozen VAE once and train "
                                "on the stored latents (DESIGN.md §6); off: encode every batch on the fly")
    train_text_encoder: bool = Field(False, description="train the text encoder with the UNet (a randomly "
                                                        "initialised domain encoder must learn the words; PRISM "
                                                        "freezes a pretrained CLIP)")
    seed: int = 0
    checkpoint_every: int = Field(100, ge=1)
    run_name: str = "cfgen-train"
    vae: VAEPretrainConfig = VAEPretrainConfig()
    cpus_per_worker: float = Field(1.0, gt=0)

    @model_validator(mode="after")
    def _check_device(self) -> "TrainConfig":
        if self.precision == "fp16" and not self.use_gpu:
            raise ValueError("precision fp16 needs a GPU (DeepSpeed refuses fp16 on CPU): use bf16 or fp32")
        return self


_FILTER_OPS = ("eq", "ne", "in", "gt", "ge", "lt", "le", "missing")


def _normalize_where(where: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """A rule's filters as {column: {op: value}}: a bare value means eq, a list means in."""
    out = {}
    for column, cond in where.items():
        if isinstance(cond, dict):
            unknown = set(cond) - set(_FILTER_OPS)
            if unknown or not cond:
                raise ValueError(f"where.{column}: operators are {list(_FILTER_OPS)}, got {sorted(cond) or 'none'}")
            out[column] = dict(cond)
        elif isinstance(cond, list):
            out[column] = {"in": list(cond)}
        else:
            out[column] = {"eq": cond}
    return out


class PlanRule(_Section):
    """One line of an edit plan: which rows (metadata filters, splits) get which edits, how, and how many seeds.

    `where` maps a column to a value (equality), a list (membership) or operators, e.g. {age: {gt: 40}}; a row with
    the column missing never matches a comparison (use {missing: true} to select those). `settings` are EditConfig
    fields (method, steps, guidance, ...) that replace the edit section's for this rule only."""

    name: str | None = Field(None, description="label of the rule in keys and summaries (default rule-<index>)")
    where: dict[str, Any] = {}
    splits: list[str] | None = Field(None, description="splits this rule reads (default: the job's)")
    edits: list[dict[str, Any]] = Field(min_length=1)
    seeds: list[int] = Field([0], min_length=1)
    settings: dict[str, Any] = {}
    limit: int | None = Field(None, ge=1, description="at most this many images, chosen by key hash")

    _edits = field_validator("edits")(lambda cls, v: _normalize_edits(v))
    _where = field_validator("where")(lambda cls, v: _normalize_where(v))

    @field_validator("settings")
    @classmethod
    def _settings(cls, v: dict[str, Any]) -> dict[str, Any]:
        banned = {"plan", "edits", "seed", "limit"} & set(v)
        if banned:
            raise ValueError(f"a rule's settings cannot set {sorted(banned)}: they are the rule's own fields")
        return v


class OutputConfig(_Section):
    """What the generation job writes beside its Parquet rows."""

    png: bool = True
    panels: bool = Field(True, description="factual | counterfactual | truth | difference, one PNG per key")
    dicom: bool = Field(False, description="a de-identified derived DICOM per counterfactual (highdicom Secondary "
                                           "Capture; DICOM PS3.15 Basic Application Level Confidentiality Profile)")
    pseudonym: str = Field("ANONYMOUS", description="PatientName/PatientID written to derived DICOMs")
    progress_every_s: float = Field(30.0, gt=0, description="seconds between progress lines")


#: The editing methods that make one candidate per self-replace setting, for the engine's `select` to choose from
#: (ddpm makes one per direction scale when `edit_guidance` is a list: `EditConfig.sweep_size`).
SWEEP_METHODS = ("p2p", "null_text", "direct")


class EditConfig(_Section):
    """How counterfactuals are made (`cfgen.editing.engine`)."""

    method: Literal["ddim", "sdedit", "p2p", "null_text", "direct", "ddpm"] = Field(
        "ddim",
        description="ddim: DDIM invert + regenerate; sdedit: noise to `strength`, then denoise; p2p: DDIM inversion + "
                    "Prompt-to-Prompt sweep; null_text: PRISM's null-text inversion + Prompt-to-Prompt sweep; direct: "
                    "Direct Inversion (source branch kept on the inversion) + Prompt-to-Prompt sweep; ddpm: "
                    "edit-friendly DDPM inversion (exact reconstruction), skipping `ddpm_skip` of the steps",
    )
    num_inference_steps: int = Field(20, ge=1)
    guidance_scale: float = Field(1.0, ge=1.0)
    strength: float = Field(0.6, gt=0, le=1, description="SDEdit: how far up the noise schedule the image goes")
    cross_replace: float = Field(0.8, ge=0, le=1, description="Prompt-to-Prompt: fraction of the steps (from x_T) "
                                                              "with the factual prompt's cross-attention injected")
    self_replace: list[Annotated[float, Field(ge=0, le=1)]] = Field(
        [0.4, 0.6, 0.8], min_length=1,
        description="Prompt-to-Prompt: fractions of the steps with self-attention injected, a sweep (one candidate "
                    "each; the engine's `select` keeps one per image, by default the largest)",
    )
    edit_word_weight: float = Field(2.0, gt=0, description="Prompt-to-Prompt: re-weighting of the edited tokens")
    null_text_inner_steps: int = Field(10, ge=0, description="null-text: Adam steps per timestep")
    null_text_early_stop: float = Field(1e-5, ge=0, description="null-text: stop a timestep's optimisation of an "
                                                                "image once its loss is below this")
    ddpm_skip: float = Field(0.2, ge=0, lt=1, description="DDPM inversion: fraction of the first (noisiest) steps "
                                                          "skipped; the edit starts from the noisy latent there")
    edit_guidance: Annotated[float, Field(ge=0)] | list[Annotated[float, Field(ge=0)]] = Field(
        1.0, description="ddpm: scale on the edit's direction eps(edited) - eps(factual) (directed editing; 1 with "
                         "threshold 0 is the plain edit). A list is a sweep: every edit is made at each scale in "
                         "the same UNet calls (each costs its own rows) and the engine's `select` keeps one per "
                         "image (the job and Serve: the attribute classifier, `cfgen.metrics.selection`; without "
                         "one, the smallest scale)")
    edit_threshold: float = Field(0.0, ge=0, lt=1, description="ddpm: implicit mask, the quantile of the edit "
                                  "direction's magnitude below which a latent cell is left unedited (0: none)")
    edit_renoise: float = Field(0.0, ge=0, le=1, description="ddpm, directed: share of fresh noise mixed into "
                                "the noise maps inside the implicit mask, so the model redraws what the edit "
                                "removes instead of the maps holding it (0: off; worse on every phantom edit "
                                "measured, bench/RESULTS.md)")
    composite: bool = Field(True, description="counterfactual = input + (edited - null edit): keeps the input's "
                                              "own pixels wherever the edit changes nothing")
    change_threshold: float = Field(
        0.0, ge=0, lt=1,
        description="keep the composite's change only where it reaches this fraction of the image's largest "
                    "(smoothed) change: the edit's own mask, against the diffuse drift of a strong edit; 0: off. "
                    "Needs composite")
    change_smoothing: int = Field(2, ge=0, le=16, description="pixels the change is smoothed over before the "
                                                             "threshold, and the mask grown and feathered by")
    change_grow: float = Field(
        0.0, ge=0, lt=1,
        description="hysteresis of the change mask: also keep the pixels connected to it whose own (unsmoothed) "
                    "change reaches this fraction of the image's largest, so a removed line (a lead, a tube) is not "
                    "thinned out by the smoothing; 0: off. Needs change_threshold")
    change_fill: Literal["composite", "edited"] = Field(
        "composite",
        description="inside the change mask: 'composite' (input + edited - null edit, the input's grain kept) or "
                    "'edited' (the decoded edit itself, for removals of what the autoencoder cannot hold). Needs "
                    "change_threshold")
    hold: list[str] = Field(
        [], description="ddpm: binary attributes every edit must keep as they are (e.g. [support_devices] where the "
                        "data confound devices with effusion): their direction is removed from the edit's at "
                        "every step, one more UNet row per attribute and step; an edit's own attributes are not "
                        "held")
    confine: Literal["none", "mask"] = Field("none", description="'mask': edit only inside the row's mask_uri "
                                                                 "(e.g. a lung segmentation), grown by mask_dilation")
    mask_dilation: int = Field(2, ge=0, description="pixels the confining mask is grown by")
    edits: list[dict[str, Any]] = [{"support_devices": 0}, {"pleural_effusion": 1}]
    seed: int = 0
    batch_size: int = Field(16, ge=1)
    pad_batches: bool = Field(
        False, description="pad every engine call to batch_size images (Serve: serve.max_batch_size) with filler "
                           "images whose results are dropped, so that an image's counterfactual is the same to the "
                           "bit whatever batch, rerun, resume or actor count it comes from (a batch of another size "
                           "rounds differently: bench/RESULTS.md); costs the partial batches' padding and the reuse "
                           "of inversions across calls")
    num_actors: int = Field(1, ge=1)
    cpus_per_actor: float = Field(0.5, gt=0)
    gpus_per_actor: float = Field(0.0, ge=0)
    stages: Literal["auto", "fused", "separate"] = Field(
        "auto",
        description="fused: each editing actor also measures and commits its batches (no hop of the images "
                    "through the object store, one actor pool to start); separate: a measuring actor and a "
                    "committing actor after the editing pool, so PNG encoding and metrics stay off a GPU actor; "
                    "auto: fused without GPUs, separate with them")
    limit: int | None = Field(None, ge=1, description="edit at most N images, chosen by key hash (the same N in "
                                                      "every run)")
    plan: list[PlanRule] = Field([], description="edit plan; empty: every row gets `edits` at `seed`")
    retry_failed: bool = Field(False, description="rerun keys that failed in an earlier run (default: a failure "
                                                  "is final, so a resumed job does not loop on a bad image)")
    output: OutputConfig = OutputConfig()
    age_range: tuple[float, float] = Field((0, 120), description="an age shift that leaves this range is not "
                                                                 "applied to that row (the row says so)")

    _edits = field_validator("edits")(lambda cls, v: _normalize_edits(v))

    @field_validator("edit_guidance")
    @classmethod
    def _guidance_sweep(cls, v):
        if isinstance(v, list):
            if not v:
                raise ValueError("edit_guidance: a sweep needs at least one scale")
            if len(set(v)) != len(v):
                raise ValueError(f"edit_guidance: a sweep's scales must differ, got {v}")
            return v[0] if len(v) == 1 else sorted(v)
        return v

    @property
    def guidance_scales(self) -> list[float]:
        """`edit_guidance` as a list: one scale, or a sweep's."""
        return list(self.edit_guidance) if isinstance(self.edit_guidance, list) else [self.edit_guidance]

    @property
    def sweep_size(self) -> int:
        """Candidates the engine makes per edit and image, for `select` to choose from (1: no choice)."""
        if self.method in SWEEP_METHODS:
            return len(self.self_replace)
        return len(self.guidance_scales) if self.method == "ddpm" else 1

    @model_validator(mode="after")
    def _directed_needs_ddpm(self) -> "EditConfig":
        if (self.edit_guidance != 1.0 or self.edit_threshold != 0.0 or self.edit_renoise) and self.method != "ddpm":
            raise ValueError(f"edit_guidance / edit_threshold / edit_renoise (directed editing) apply to method "
                             f"'ddpm', not {self.method!r}")
        if self.change_threshold and not self.composite:
            raise ValueError("change_threshold (the edit's own mask) confines the composite's difference: set "
                             "composite: true")
        if self.change_grow and not self.change_threshold:
            raise ValueError("change_grow grows the edit's own change mask: set change_threshold too")
        if self.change_fill != "composite" and not self.change_threshold:
            raise ValueError(f"change_fill {self.change_fill!r} says what fills the edit's own change mask: set "
                             "change_threshold too")
        if self.hold and self.method != "ddpm":
            raise ValueError(f"hold (attributes an edit keeps) applies to method 'ddpm', not {self.method!r}")
        return self

    def describe(self) -> str:
        """The method and the settings that shape its output, in one line (job summaries and reports)."""
        parts = [self.method, f"{self.num_inference_steps} steps", f"guidance {self.guidance_scale:g}"]
        if self.method == "sdedit":
            parts.append(f"strength {self.strength:g}")
        if self.method == "ddpm":
            parts.append(f"skip {self.ddpm_skip:g}")
            if self.edit_guidance != 1.0 or self.edit_threshold:
                scales = "/".join(f"{g:g}" for g in self.guidance_scales)
                sweep = " (a sweep, one kept per image)" if self.sweep_size > 1 else ""
                parts.append(f"directed {scales}x{sweep} above the {self.edit_threshold:g} quantile")
            if self.edit_renoise:
                parts.append(f"renoise {self.edit_renoise:g}")
            if self.hold:
                parts.append("holding " + ", ".join(self.hold))
        parts.append(f"composite {self.composite}")
        if self.change_threshold:
            parts.append(f"change mask {self.change_threshold:g}"
                         + (f" grown to {self.change_grow:g}" if self.change_grow else "") + f" (fill {self.change_fill})")
        parts.append(f"confine {self.confine}")
        return ", ".join(parts)


class ClassifierTrainConfig(_Section):
    """How the attribute classifier is trained (Ray Train, DDP: gloo on CPU, NCCL on GPU)."""

    num_workers: int = Field(2, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    batch_size: int = Field(32, ge=2, description="per worker")
    epochs: int = Field(8, ge=1)
    lr: float = Field(2e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    seed: int = 0
    augment: bool = Field(True, description="small shifts, rotations and zooms; never flips or intensity changes")
    max_pos_weight: float = Field(10.0, ge=1, description="cap on the rare-class weight n_neg / n_pos")
    decorrelate: float | None = Field(
        0.1, ge=0, le=1,
        description="reweight training images so that every pair of binary labels correlated beyond this |phi| is "
                    "independent in the weighted data (a classifier that measures edits must not read one finding "
                    "off another); None trains on the raw co-occurrences",
    )
    materialize_max_mb: float = Field(
        512, ge=0, description="hold the decoded training rows in Ray's object store when they are at most this "
                               "large (every epoch then reads memory, not Parquet); larger sets stream per epoch",
    )
    run_name: str = "cfgen-classifier"


class ClassifierConfig(_Section):
    """The attribute classifier: the instrument every effectiveness, minimality and realism figure is read off.

    Binary attributes (findings, smoking, sex as P(male)) get one calibrated logit each; age is a regression head
    in years. The backbone's pooled features feed realism (Frechet distance) and minimality (feature distance)."""

    attributes: list[str] = Field(
        ["support_devices", "pleural_effusion", "cardiomegaly", "smoking", "sex", "age"],
        description="heads, one per attribute: any of sex, age, smoking and the 14 CheXpert findings",
    )
    architecture: Literal["densenet", "densenet121"] = Field(
        "densenet", description="MONAI DenseNet built from the sizes below, or MONAI's DenseNet121 (GPU-sized)"
    )
    init_features: int = Field(16, ge=4)
    growth_rate: int = Field(12, ge=4)
    block_config: list[int] = [3, 6, 6]
    dropout: float = Field(0.0, ge=0, lt=1)
    image_size: int = Field(64, ge=32, le=1024, description="images are resized to this before the network")
    uncertain: Literal["mask", "positive", "negative"] | None = Field(
        None, description="CheXpert -1 labels; None follows data.prompt.uncertain (omit/uncertain -> mask)"
    )
    pretrained: str | None = Field(
        None, description="a trained classifier: local folder, s3:// folder or models:/name@alias; None trains one"
    )
    registered_model: str = "cfgen-classifier"
    bootstrap: int = Field(1000, ge=0, description="bootstrap resamples for the AUROC 95% CI")
    train: ClassifierTrainConfig = ClassifierTrainConfig()

    @field_validator("attributes")
    @classmethod
    def _known(cls, v: list[str]) -> list[str]:
        from cfgen.io.prompts import KNOWN_ATTRIBUTES

        unknown = [a for a in v if a not in KNOWN_ATTRIBUTES]
        if unknown or not v or len(set(v)) != len(v):
            raise ValueError(f"classifier.attributes {v}: give distinct names from {list(KNOWN_ATTRIBUTES)}")
        return v

    @field_validator("pretrained")
    @classmethod
    def _local_folder(cls, v: str | None) -> str | None:
        return _absolute(v) if v and Path(v.removeprefix("file://")).exists() else v


class MetricsConfig(_Section):
    """The per-edit metric stage of generation (classifier-based effectiveness, preservation, minimality)."""

    enabled: bool = Field(True, description="score every counterfactual with the classifier")
    reversibility: bool = Field(False, description="also edit back (invert the counterfactual, regenerate the "
                                                   "factual prompt): one more inversion and sample per edit")
    cpus_per_actor: float = Field(0.25, gt=0)


class DiscoveryConfig(_Section):
    """`cfgen discover`: intervene on attributes across a population, test what changes where (issue 17)."""

    interventions: list[dict[str, Any]] = Field(
        [{"smoking": 1}], description="do() per population, e.g. {smoking: 1} or {age: '+10'} (a shift in years); "
                                      "each eligible subject (known factual value, a different target) gets it")
    null_controls: list[dict[str, Any]] = Field(
        [], description="interventions that should change nothing; reported like the others, so a reader sees "
                        "what a false finding looks like")
    splits: list[str] = Field(["test"], description="the population: these splits of the data set")
    seeds: list[int] = Field([0], description="edit seeds per subject; a subject's seeds are averaged before a test")
    alpha: float = Field(0.05, gt=0, lt=1, description="test level, CI 1 - alpha, FDR level of the pixel maps")
    test: Literal["t", "wilcoxon"] = Field("t", description="paired test of the region statistics")
    bootstrap: int = Field(2000, ge=100, description="bootstrap resamples of each region CI")
    min_subjects: int = Field(10, ge=3, description="fewer eligible subjects: no test, a report line says so")
    min_effect: float = Field(
        0.01, ge=0, description="the smallest region effect worth a finding, set before the run: a row is flagged "
                                "only where its CI clears +/- this (image intensities on [0, 1]; 0.01 is 1% of the "
                                "range, ~2.5 of 256 grey levels, near the contrast a reader can see). 0: any "
                                "effect whose CI excludes 0")
    masks: dict[str, str] = Field(
        {"lungs": "mask_uri"}, description="region name -> manifest column of mask URIs; 'lungs' is split into "
                                           "each lung and its upper / middle / lower thirds")
    expected_effects: dict[str, list[str]] = Field(
        {}, description="attributes an intervention may move besides its own (the causal graph's descendants); "
                        "every other shift the classifier reads is checked for entanglement")
    entanglement_min_shift: float = Field(0.05, ge=0, le=1, description="a shift of P(other) smaller than this is "
                                                                        "not flagged, however significant")
    per_unit: dict[str, float] = Field({"age": 10.0}, description="effect sizes per this many units (per decade)")
    limit: int | None = Field(None, ge=1, description="at most this many subjects (test runs)")
    edit: dict[str, Any] = Field(
        {}, description="edit settings of discovery's counterfactuals, over the `edit` section's (e.g. {edit_guidance: "
                        "3}): generation wants the least change that makes each edit, discovery a population's size "
                        "and what the model entangles, which the classifier-chosen least change understates (on the "
                        "phantoms a sweep kept 1.5x and read smoking at 0.56x where one 3x scale read 1.00x; "
                        "bench/RESULTS.md)")
    examples: int = Field(6, ge=0, description="factual | counterfactual pairs shown per intervention")
    batch_rows: int = Field(256, ge=1, description="rows per batch of the analysis: an actor reads this many rows' "
                                                    "images at a time, the driver streams their numbers in batches "
                                                    "of this size (bounds both memories)")
    num_actors: int = Field(2, ge=1, description="Ray Data actors reading the PNGs and masks into region means")
    cpus_per_actor: float = Field(0.5, gt=0)

    _edits = field_validator("interventions", "null_controls")(lambda cls, v: _normalize_edits(v))


class TrackingConfig(_Section):
    tracking_uri: str = Field("sqlite:///runs/mlflow.db", description="sqlite:/// or http:// MLflow server")
    experiment: str = "cfgen"
    registered_model: str = "cfgen-sd"
    alias: str = "champion"

    @field_validator("tracking_uri")
    @classmethod
    def _absolute_sqlite(cls, v: str) -> str:
        # a relative sqlite path would name another database in each Ray worker's working directory
        if v.startswith("sqlite:///") and not v.startswith("sqlite:////"):
            return "sqlite:///" + _absolute(v.removeprefix("sqlite:///"))
        return v


class RayConfig(_Section):
    address: str | None = Field(None, description="None starts a local Ray on 127.0.0.1; 'auto' joins a cluster")
    num_cpus: int | None = Field(None, description="logical CPUs for a local Ray (more than cores keeps I/O going)")
    object_store_memory: int | None = None
    dashboard: bool | None = Field(
        None, description="start Ray's dashboard (127.0.0.1, port 8265 or the next free one) with a local Ray. Its "
                          "state API is what Ray Train's placement-group cleaner polls once a second to free a "
                          "crashed run's resources: without it the cleaner cannot work and logs a warning on every "
                          "poll. None: on for the jobs that train (demo, train, classify), off for the others (ten "
                          "more processes, ~1 s of CPU at start)")


class AutoscalingConfig(_Section):
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    target_ongoing_requests: float = Field(4.0, gt=0)


class ServeConfig(_Section):
    """Ray Serve (cfgen/serve): the HTTP app, its editing deployment and the limits every request is held to."""

    host: str = Field("127.0.0.1", description="HTTP bind address (0.0.0.0 inside a pod)")
    port: int = Field(8000, ge=1, le=65535)
    route_prefix: str = "/"
    model_uri: str | None = Field(None, description="the model to serve: models:/name@alias, a diffusers folder or "
                                                    "s3:// URI; None: model.pretrained, else the registry alias")
    auth_token: SecretStr | None = Field(None, description="bearer token every /v1 request must carry (None: no "
                                                           "auth); from config or CFGEN_SERVE_TOKEN, never logged")
    batching: bool = Field(True, description="dynamic batching of edit requests (@serve.batch)")
    max_batch_size: int = Field(8, ge=1)
    batch_wait_timeout_s: float = Field(0.05, ge=0)
    max_ongoing_requests: int = Field(16, ge=1, description="concurrent requests a replica accepts before queueing")
    max_upload_mb: float = Field(20.0, gt=0)
    max_pixels: int = Field(40_000_000, ge=1, description="rows x columns an upload may declare (checked before "
                                                           "its pixels are decoded: decompression bombs)")
    max_steps: int = Field(50, ge=1)
    max_guidance: float = Field(15.0, ge=1)
    max_edits: int = Field(4, ge=1, description="attributes set in one request")
    num_cpus: float = Field(1.0, gt=0, description="per editing replica")
    num_gpus: float = Field(0.0, ge=0, description="per editing replica (GPU when present)")
    autoscaling: AutoscalingConfig = AutoscalingConfig()


class JobConfig(_Section):
    """Everything a cfgen job needs. Sections a job does not use are ignored by it."""

    output_uri: str = Field("runs/demo", description="where a job writes (local dir or s3://)")
    storage: StorageConfig = StorageConfig()
    phantoms: PhantomConfig = PhantomConfig()
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    edit: EditConfig = EditConfig()
    classifier: ClassifierConfig = ClassifierConfig()
    metrics: MetricsConfig = MetricsConfig()
    discovery: DiscoveryConfig = DiscoveryConfig()
    tracking: TrackingConfig = TrackingConfig()
    ray: RayConfig = RayConfig()
    serve: ServeConfig = ServeConfig()

    _local_output = field_validator("output_uri")(lambda cls, v: _absolute(v))

    def discovery_edit(self) -> EditConfig:
        """The edit settings discovery edits with: `discovery.edit` over `edit`. Checked when discovery starts, not
        with the config: other jobs may override `edit` (say `edit.method=ddim`) in ways discovery's settings do not
        fit."""
        if not self.discovery.edit:
            return self.edit
        try:
            return EditConfig.model_validate({**self.edit.model_dump(mode="python"), **self.discovery.edit})
        except ValidationError as e:
            raise ValueError(f"discovery.edit {self.discovery.edit} over this edit section is no valid edit section "
                             f"(set discovery.edit to fit edit.method, or to {{}}): {e}") from None


def _absolute(uri: str) -> str:
    """Local paths become absolute: Ray workers run in other directories than the driver."""
    if "://" in uri and not uri.startswith("file://"):
        return uri
    return str(Path(uri.removeprefix("file://")).expanduser().resolve())


def _parse_scalar(text: str) -> Any:
    return yaml.safe_load(text) if text != "" else ""


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` overrides (value parsed as YAML) to a nested dict."""
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not of the form section.key=value")
        dotted, raw = item.split("=", 1)
        node = data
        keys = dotted.strip().split(".")
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: {key!r} is not a section")
        node[keys[-1]] = _parse_scalar(raw)
    return data


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> JobConfig:
    """Read a YAML config (or the defaults) and apply CLI overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        text = Path(path).read_text()
        data = yaml.safe_load(text) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: a config must be a YAML mapping")
    return JobConfig.model_validate(apply_overrides(data, list(overrides or [])))
