"""The phantom benchmark: SCM, renderer and writers (DESIGN.md §3)."""

from __future__ import annotations

import csv
import io

import numpy as np
import pyarrow.parquet as pq
import pydicom
import pytest
from PIL import Image
from pydicom.pixels import apply_rescale
from pydicom.uid import ExplicitVRLittleEndian

from cfgen.config import PHANTOM_ATTRIBUTES, PhantomConfig, PhantomEffects
from cfgen.phantoms import (
    MANIFEST_COLUMNS,
    DicomEncoding,
    PhantomSCM,
    dicom_bytes,
    dicom_encoding,
    phantom_dicom,
    render,
    render_regions,
    write_manifest,
    write_phantom_shard,
    write_phantoms,
)

SIZE = 96


def _find(scm: PhantomSCM, predicate, limit: int = 5000):
    for i in range(limit):
        subject = scm.subject(i)
        if predicate(subject):
            return subject
    raise AssertionError("no subject in the first indices satisfies the predicate")


def _decode(ds: pydicom.Dataset) -> np.ndarray:
    """Stored -> modality values -> [0, 1], then undo MONOCHROME1's inversion, as a careful reader would."""
    modality = apply_rescale(ds.pixel_array, ds).astype(np.float64)
    full_scale = float(ds.RescaleSlope) * ((1 << ds.BitsStored) - 1)
    image = (modality - float(ds.RescaleIntercept)) / full_scale
    return 1.0 - image if ds.PhotometricInterpretation == "MONOCHROME1" else image


@pytest.fixture(scope="module")
def scm() -> PhantomSCM:
    return PhantomSCM(PhantomConfig(seed=3, size=SIZE))


# ------------------------------------------------------------------------------------------------------------ SCM
def test_subject_depends_only_on_seed_and_index():
    small, large = PhantomSCM(PhantomConfig(n=5, seed=7)), PhantomSCM(PhantomConfig(n=5000, seed=7))
    assert small.subject(4) == large.subject(4)
    assert small.subject(4).subject_id == "PH000004"
    assert small.subject(4).noise != small.subject(5).noise
    assert PhantomSCM(PhantomConfig(seed=8)).subject(4).noise != small.subject(4).noise


def test_rendering_is_deterministic_and_differs_between_subjects(scm):
    a1, m1 = render(scm.subject(1), SIZE)
    a2, m2 = render(scm.subject(1), SIZE)
    b, _ = render(scm.subject(2), SIZE)
    assert np.array_equal(a1, a2) and np.array_equal(m1, m2)
    assert np.abs(a1 - b).mean() > 0.005


def test_prevalences_follow_config():
    prevalence = {"smoking": 0.3, "support_devices": 0.25, "pleural_effusion": 0.25, "cardiomegaly": 0.2}
    scm = PhantomSCM(PhantomConfig(seed=1))
    subjects = [scm.subject(i) for i in range(4000)]
    for name, p in prevalence.items():
        assert abs(np.mean([getattr(s, name) for s in subjects]) - p) < 0.03, name
    assert abs(np.mean([s.sex == "M" for s in subjects]) - 0.5) < 0.03
    ages = np.array([s.age for s in subjects])
    assert ages.min() >= 20 and ages.max() <= 90 and 50 < ages.mean() < 65


@pytest.mark.parametrize("confounding", [1.0, 0.0])
def test_confounding_knob_couples_devices_to_effusion(confounding):
    scm = PhantomSCM(PhantomConfig(seed=2, confounding=confounding))
    pairs = np.array([(s.support_devices, s.pleural_effusion) for s in scm.subjects(0, 2000)], dtype=float)
    if confounding == 1.0:
        assert (pairs[:, 0] == pairs[:, 1]).mean() > 0.95
    else:
        assert abs(np.corrcoef(pairs.T)[0, 1]) < 0.06


def test_missing_fraction_hides_about_that_share_of_cells():
    scm = PhantomSCM(PhantomConfig(seed=4, missing_fraction=0.3))
    masks = [scm.missing_mask(s) for s in scm.subjects(0, 1000)]
    hidden = np.array([[m[name] for name in PHANTOM_ATTRIBUTES] for m in masks])
    assert abs(hidden.mean() - 0.3) < 0.03
    assert masks[0] == scm.missing_mask(scm.subject(0))


def test_intervention_rejects_unknown_attributes_and_values(scm):
    s = scm.subject(0)
    for bad in ({"weight": 1}, {"age": 10}, {"age": 50.5}, {"smoking": 2}, {"sex": "X"}, {"cardiomegaly": 0.5}, [("age", 50)]):
        with pytest.raises(ValueError):
            scm.intervene(s, bad)


def test_the_empty_intervention_is_the_null_edit(scm):
    s = scm.subject(0)
    assert scm.intervene(s, {}).attributes() == s.attributes()
    assert np.array_equal(scm.render_counterfactual(s, {}, 64)[0], scm.render(s, 64)[0])


def test_do_age_recomputes_cardiomegaly_with_the_same_noise(scm):
    s = _find(scm, lambda s: s.age < 40 and not s.cardiomegaly and scm.intervene(s, {"age": 90}).cardiomegaly)
    cf = scm.intervene(s, {"age": 90})
    assert cf.noise == s.noise and cf.noise_seed == s.noise_seed and cf.sex == s.sex
    assert (cf.age, cf.cardiomegaly) == (90, 1)
    # a later intervention does not undo an earlier one
    held = scm.intervene(scm.intervene(s, {"cardiomegaly": 0}), {"age": 90})
    assert (held.age, held.cardiomegaly) == (90, 0)


def test_do_effusion_leaves_devices_and_do_devices_leaves_effusion():
    scm = PhantomSCM(PhantomConfig(seed=5, confounding=1.0))
    s = _find(scm, lambda s: s.pleural_effusion == 0 and s.support_devices == 0)
    cf = scm.intervene(s, {"pleural_effusion": 1})
    assert (cf.pleural_effusion, cf.support_devices) == (1, 0)
    s = _find(scm, lambda s: s.pleural_effusion == 1 and s.support_devices == 1)
    assert scm.intervene(s, {"support_devices": 0}).attributes() == {**s.attributes(), "support_devices": 0}
    assert scm.intervene(s, {"pleural_effusion": 0}).support_devices == 1


def test_redraw_takes_the_donors_noise_and_re_solves_the_attributes():
    scm = PhantomSCM(PhantomConfig(seed=5))
    s = _find(scm, lambda s: s.smoking == 0)
    donor = next(i for i in range(1, 5000) if scm.subject(i).noise.z_age != s.noise.z_age)
    other = scm.redraw(s, ("z_age",), donor)
    assert other.noise.z_age == scm.subject(donor).noise.z_age
    assert other.noise.z_smoking == s.noise.z_smoking  # the rest of the noise is the subject's
    assert other.attributes() == scm._solve(other.noise, {})
    held = scm.redraw(scm.intervene(s, {"smoking": 1}), ("z_smoking",), donor)
    assert held.smoking == 1  # an intervention survives the redraw


# ------------------------------------------------------------------------------------------ identifiability floor
def test_a_new_effusions_side_is_unseen_and_bounds_any_edit():
    from cfgen.config import DecodeConfig
    from cfgen.phantoms.truth import counterfactual_posterior, floor_errors, true_counterfactual, unseen_noise

    scm, decode = PhantomSCM(PhantomConfig(seed=5, size=64)), DecodeConfig(size=64, dtype="uint8")
    s = _find(scm, lambda s: s.pleural_effusion == 0 and s.support_devices == 0)
    hidden = unseen_noise(scm, s.index, decode)
    assert {"u_effusion_side", "meniscus", "device_x", "lead_bend"} <= set(hidden)  # no fluid, no device to see
    assert not {"heart_size", "rib_phase", "lung_width", "u_split"} & set(hidden)  # seen, or in the row
    effusion, devices_on = counterfactual_posterior(scm, s.index, [{"pleural_effusion": 1}, {"support_devices": 1}],
                                                    decode, draws=24)
    assert len(effusion) == len(devices_on) == 24
    truth = true_counterfactual(scm, s.index, {"pleural_effusion": 1}, decode).astype(np.float64) / 255
    factual = true_counterfactual(scm, s.index, {}, decode).astype(np.float64) / 255
    # draws differ in where the fluid goes (left, right or both) but never in what the factual image shows
    halves = np.abs(effusion.astype(np.float64) / 255 - factual).reshape(24, 64, 2, 32).sum(axis=(1, 3)) > 0.5
    assert halves[:, 0].any() and halves[:, 1].any() and not halves.all()
    best, sampled = floor_errors(truth, effusion.astype(np.float64) / 255)
    assert 0 < best <= sampled < np.abs(truth - factual).mean() * 2.5
    # a device added where none is seen goes wherever its unseen noise puts it: not identifiable either
    assert len({d.tobytes() for d in devices_on}) > 1


def test_removing_a_visible_device_is_identifiable():
    from cfgen.config import DecodeConfig
    from cfgen.phantoms.truth import counterfactual_posterior, floor_errors, true_counterfactual

    scm, decode = PhantomSCM(PhantomConfig(seed=5, size=64)), DecodeConfig(size=64, dtype="uint8")
    s = _find(scm, lambda s: s.support_devices == 1 and s.pleural_effusion == 0)
    (removed,) = counterfactual_posterior(scm, s.index, [{"support_devices": 0}], decode, draws=8)
    truth = true_counterfactual(scm, s.index, {"support_devices": 0}, decode)
    assert all(np.array_equal(d, truth) for d in removed)
    assert floor_errors(truth / 255.0, removed / 255.0) == (0.0, 0.0)



def test_an_edits_truth_holds_what_the_intervention_causes_unless_asked_for_the_total_effect():
    """do(age=+10) with the prompt's other attributes held is what an edit of "63 year old" asks for; the SCM's
    own counterfactual also lets age's descendants follow (here a new finding)."""
    from cfgen.config import DecodeConfig
    from cfgen.phantoms.truth import changes_truth, held_intervention, true_counterfactual

    scm, decode = PhantomSCM(PhantomConfig(seed=5, size=64)), DecodeConfig(size=64, dtype="uint8")

    def older(s):
        return {"age": min(s.age + 10, 90)}

    s = _find(scm, lambda s: s.age <= 80 and scm.intervene(s, older(s)).attributes() != {**s.attributes(), **older(s)})
    edit = older(s)
    assert held_intervention(s, edit) == {**s.attributes(), **edit}
    assert scm.intervene(s, held_intervention(s, edit)).attributes() == {**s.attributes(), **edit}
    direct = true_counterfactual(scm, s.index, edit, decode)
    total = true_counterfactual(scm, s.index, edit, decode, effect="total")
    factual = true_counterfactual(scm, s.index, {}, decode)
    assert not np.array_equal(direct, total) and not np.array_equal(direct, factual)
    assert changes_truth(scm, s.index, edit) and changes_truth(scm, s.index, edit, effect="total")
    # an attribute with no descendants: both truths are one image
    smoker = _find(scm, lambda s: s.smoking == 0)
    assert np.array_equal(true_counterfactual(scm, smoker.index, {"smoking": 1}, decode),
                          true_counterfactual(scm, smoker.index, {"smoking": 1}, decode, effect="total"))
    with pytest.raises(ValueError, match="effect must be one of"):
        true_counterfactual(scm, s.index, edit, decode, effect="natural")


# ---------------------------------------------------------------------------------------------------- renderer
def test_do_support_devices_changes_only_device_pixels(scm):
    s = _find(scm, lambda s: s.support_devices == 1)
    cf = scm.intervene(s, {"support_devices": 0})
    assert cf.attributes() == {**s.attributes(), "support_devices": 0}
    image, _ = scm.render(s)
    cf_image, _ = scm.render(cf)
    device = render_regions(s, SIZE, scm.config.effects)["device"]
    changed = image != cf_image
    assert device.sum() > 20
    assert not (changed & ~device).any()
    assert changed[device].mean() > 0.95
    assert (image - cf_image)[device].mean() > 0.3  # the device is bright metal


def test_do_smoking_shifts_only_the_lung_field_by_the_planted_amount(scm):
    s = _find(scm, lambda s: s.smoking == 0 and s.support_devices == 0)
    image, lungs = scm.render(s)
    cf_image, cf_lungs = scm.render_counterfactual(s, {"smoking": 1})
    assert np.array_equal(lungs, cf_lungs)
    diff = cf_image.astype(np.float64) - image
    inside = lungs.astype(bool)
    assert not diff[~inside].any()
    assert diff[inside].mean() == pytest.approx(PhantomEffects().smoking_lung_shift, abs=0.003)


def test_effusion_brightens_the_lung_base_and_keeps_the_lung_mask(scm):
    s = _find(scm, lambda s: s.pleural_effusion == 0 and s.support_devices == 0 and s.noise.u_effusion_side < 0.4)
    image, lungs = scm.render(s)
    cf_image, cf_lungs = scm.render_counterfactual(s, {"pleural_effusion": 1})
    assert np.array_equal(lungs, cf_lungs)  # the mask is the anatomical lung field, fluid or not
    rows = np.nonzero(lungs.any(axis=1))[0]
    top, bottom = rows.min(), rows.max()
    base = lungs.astype(bool).copy()
    base[: bottom - (bottom - top) // 8] = False
    apex = lungs.astype(bool).copy()
    apex[top + (bottom - top) // 2 :] = False
    assert (cf_image - image)[base].mean() > 0.15
    assert np.array_equal(cf_image[apex], image[apex])
    effusion = render_regions(scm.intervene(s, {"pleural_effusion": 1}), SIZE)["effusion"]
    assert not ((cf_image != image) & ~effusion).any()


def test_cardiomegaly_widens_the_heart_by_the_configured_scale():
    scm = PhantomSCM(PhantomConfig(seed=6, size=256))
    s = _find(scm, lambda s: s.cardiomegaly == 0)
    width = render_regions(s, 256)["heart"].any(axis=0).sum()
    cf_width = render_regions(scm.intervene(s, {"cardiomegaly": 1}), 256)["heart"].any(axis=0).sum()
    assert cf_width / width == pytest.approx(PhantomEffects().cardiomegaly_scale, rel=0.1)


@pytest.mark.parametrize("size", [64, 128, 512])
def test_render_works_at_any_size_with_matching_geometry(scm, size):
    s = scm.subject(0)
    image, lungs = render(s, size)
    assert image.shape == lungs.shape == (size, size)
    assert image.dtype == np.float32 and lungs.dtype == np.uint8
    assert 0.0 <= image.min() and image.max() <= 1.0 and set(np.unique(lungs)) == {0, 1}
    reference = render(s, 256)[1].mean()
    assert lungs.mean() == pytest.approx(reference, abs=0.01)  # normalised geometry: same lung share at every size
    assert image[lungs.astype(bool)].mean() < image[~lungs.astype(bool)].mean()  # lungs are dark (air)


# ------------------------------------------------------------------------------------------------------- DICOM
ENCODINGS = [
    DicomEncoding("CR", "MONOCHROME1", 12, 1.0, -1024.0, False),
    DicomEncoding("DX", "MONOCHROME2", 16, 1.0, 0.0, True),
    DicomEncoding("CR", "MONOCHROME2", 12, 0.5, 0.0, False),
    DicomEncoding("DX", "MONOCHROME1", 16, 1.0, 0.0, False),
]


@pytest.mark.parametrize("encoding", ENCODINGS, ids=lambda e: f"{e.photometric_interpretation}-{e.bits_stored}bit")
def test_dicom_round_trip_recovers_the_rendered_image(scm, encoding):
    s = scm.subject(3)
    image, _ = scm.render(s)
    raw = dicom_bytes(phantom_dicom(s, image, scm.config, encoding))
    assert raw[128:132] == b"DICM"
    ds = pydicom.dcmread(io.BytesIO(raw))
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert (ds.BitsAllocated, ds.BitsStored, ds.HighBit) == (16, encoding.bits_stored, encoding.bits_stored - 1)
    assert ds.PhotometricInterpretation == encoding.photometric_interpretation
    assert np.abs(_decode(ds) - image).max() <= 0.5 / encoding.max_stored + 1e-6
    # the first window spans the whole stored range
    center = float(ds.WindowCenter[0] if encoding.second_window else ds.WindowCenter)
    width = float(ds.WindowWidth[0] if encoding.second_window else ds.WindowWidth)
    lo = encoding.rescale_intercept
    assert (center - 0.5 - (width - 1) / 2, center - 0.5 + (width - 1) / 2) == (
        lo,
        lo + encoding.rescale_slope * encoding.max_stored,
    )


def test_dicom_carries_the_standard_tags(scm):
    config = PhantomConfig(seed=3, size=64, missing_fraction=0.0)
    s = scm.subject(3)
    image, _ = render(s, 64)
    ds = pydicom.dcmread(io.BytesIO(dicom_bytes(phantom_dicom(s, image, config))))
    assert ds.PatientID == s.subject_id and ds.PatientSex == s.sex and ds.PatientAge == f"{s.age:03d}Y"
    assert ds.BodyPartExamined == "CHEST" and ds.ViewPosition == s.view_position
    assert (ds.Rows, ds.Columns, ds.SamplesPerPixel) == (64, 64, 1)
    assert float(ds.PixelSpacing[0]) == pytest.approx(0.139 * 2048 / 64)
    expected_class = {"DX": "1.2.840.10008.5.1.4.1.1.1.1", "CR": "1.2.840.10008.5.1.4.1.1.1"}[ds.Modality]
    assert ds.SOPClassUID == ds.file_meta.MediaStorageSOPClassUID == expected_class
    assert ds.SOPInstanceUID == ds.file_meta.MediaStorageSOPInstanceUID
    again = pydicom.dcmread(io.BytesIO(dicom_bytes(phantom_dicom(s, image, config))))
    other = pydicom.dcmread(io.BytesIO(dicom_bytes(phantom_dicom(scm.subject(4), image, config))))
    assert again.StudyInstanceUID == ds.StudyInstanceUID and other.StudyInstanceUID != ds.StudyInstanceUID
    for keyword in ("RescaleSlope", "RescaleIntercept", "WindowCenter", "WindowWidth", "SeriesInstanceUID"):
        assert keyword in ds


def test_dicom_leaves_hidden_metadata_out():
    config = PhantomConfig(size=64, missing_fraction=1.0)
    s = PhantomSCM(config).subject(0)
    ds = pydicom.dcmread(io.BytesIO(dicom_bytes(phantom_dicom(s, render(s, 64)[0], config))))
    assert "PatientAge" not in ds and ds.PatientSex == ""


def test_dicom_encodings_vary_across_subjects():
    config = PhantomConfig(seed=0)
    encodings = [dicom_encoding(config, i) for i in range(60)]
    assert {e.photometric_interpretation for e in encodings} == {"MONOCHROME1", "MONOCHROME2"}
    assert {e.bits_stored for e in encodings} == {12, 16}
    assert {e.modality for e in encodings} == {"DX", "CR"}
    assert any(e.rescale_slope != 1.0 or e.rescale_intercept != 0.0 for e in encodings)
    assert all(e.rescale_slope == 1.0 and e.rescale_intercept == 0.0 for e in encodings if e.modality == "DX")
    assert any(e.second_window for e in encodings)


# ------------------------------------------------------------------------------------------------------ writers
def _snapshot(root) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_write_phantoms_writes_images_masks_and_a_manifest_with_gaps(tmp_path):
    config = PhantomConfig(n=12, size=64, seed=9, formats=["dicom", "png"], missing_fraction=0.3)
    summary = write_phantoms(config, str(tmp_path))
    assert summary["n_images"] == 24
    for i in range(12):
        for name in (f"images/PH{i:06d}.dcm", f"images/PH{i:06d}.png", f"masks/PH{i:06d}.png"):
            assert (tmp_path / name).is_file(), name

    table = pq.read_table(tmp_path / "manifest.parquet")
    assert tuple(table.column_names) == MANIFEST_COLUMNS and table.num_rows == 24
    rows = table.to_pylist()
    assert rows[0]["image_id"] == "PH000000_dicom" and rows[1]["image_id"] == "PH000000_png"
    assert rows[0]["image_uri"] == str(tmp_path / "images/PH000000.dcm")
    assert {r["split"] for r in rows} <= {"train", "validate", "test"}

    attributes = ["sex", "age", "smoking", "support_devices", "pleural_effusion", "cardiomegaly"]
    nulls = sum(table.column(name).null_count for name in attributes)
    assert 0.15 < nulls / (24 * len(attributes)) < 0.45
    with open(tmp_path / "manifest.csv", newline="") as f:
        csv_rows = list(csv.DictReader(f))
    assert len(csv_rows) == 24
    assert sum(row[name] == "" for row in csv_rows for name in attributes) == nulls

    # every shown value is the subject's true attribute; the files hold the rendered image and lung mask
    scm = PhantomSCM(config)
    for row in rows[::2]:
        subject = scm.subject(row["phantom_index"])
        if row["age"] is not None:
            assert row["age"] == subject.age
        if row["support_devices"] is not None:
            assert row["support_devices"] == subject.support_devices
    image, lungs = render(scm.subject(5), 64)
    png = np.asarray(Image.open(tmp_path / "images/PH000005.png"))
    assert png.dtype == np.uint16 and np.abs(png / 65535.0 - image).max() <= 0.5 / 65535 + 1e-6
    assert np.array_equal(np.asarray(Image.open(tmp_path / "masks/PH000005.png")), lungs * 255)
    ds = pydicom.dcmread(tmp_path / "images/PH000005.dcm")
    assert np.abs(_decode(ds) - image).max() <= 0.5 / ((1 << ds.BitsStored) - 1) + 1e-6


def test_rewriting_gives_identical_bytes_and_shards_compose(tmp_path):
    config = PhantomConfig(n=6, size=64, seed=11, formats=["dicom"])
    write_phantoms(config, str(tmp_path))
    first = _snapshot(tmp_path)
    write_phantoms(config, f"file://{tmp_path}")
    assert _snapshot(tmp_path) == first

    sharded = tmp_path / "sharded"
    rows = write_phantom_shard(config, str(sharded), 0, 4) + write_phantom_shard(config, str(sharded), 4, 6)
    write_manifest(rows, str(sharded))
    assert [r["image_id"] for r in rows] == [f"PH{i:06d}" for i in range(6)]
    assert (sharded / "images/PH000003.dcm").read_bytes() == first["images/PH000003.dcm"]
    assert pq.read_table(sharded / "manifest.parquet").drop_columns(["image_uri", "mask_uri"]).equals(
        pq.read_table(tmp_path / "manifest.parquet").drop_columns(["image_uri", "mask_uri"])
    )
