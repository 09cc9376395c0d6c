"""Write a phantom data set (images, lung masks, manifest) to any fsspec URL: a local dir, file://, s3://.

Layout under `out_uri`::

    images/PH000123.dcm    DICOM, one per subject          (config.formats contains "dicom")
    images/PH000123.png    PNG, 16-bit by default          (config.formats contains "png")
    masks/PH000123.png     lung mask, 8-bit, 0 or 255
    manifest.csv           one row per image file; hidden metadata cells are empty
    manifest.parquet       the same rows; hidden cells are nulls
    phantom_config.json    the PhantomConfig, so the true counterfactual of any row can be rendered again

The DICOM files are deliberately varied the way real archives are, so that readers are tested on them: MONOCHROME1
and MONOCHROME2, 12 and 16 bits stored, DX and CR, identity and non-trivial modality rescale (CR only: the DX IOD
requires an identity rescale), single and multi-valued windows. Every choice is a deterministic function of
(seed, index), so rewriting the same config to the same place gives byte-identical files.

Rendering is streamed: each subject is rendered, written and dropped; only manifest rows (small dicts) are kept.
`write_phantom_shard` lets Ray tasks render disjoint index ranges; the driver then calls `write_manifest` once.
"""

from __future__ import annotations

import datetime as _dt
import io
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pydicom
from fsspec.implementations.local import LocalFileSystem
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, generate_uid

from cfgen.config import PhantomConfig, StorageConfig
from cfgen.io.storage import fsspec_filesystem
from cfgen.phantoms.render import render
from cfgen.phantoms.scm import PhantomSCM, Subject

DIGITAL_XRAY_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
COMPUTED_RADIOGRAPHY = "1.2.840.10008.5.1.4.1.1.1"
DETECTOR_PIXEL_SPACING_MM = 0.139  # a 2048-pixel flat panel of about 28.5 cm, resampled to the phantom size

#: Manifest columns, in order, with their Arrow types (nullable: missing metadata is a null, not a guess).
MANIFEST_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("patient_id", pa.string()),
        ("study_id", pa.string()),
        ("image_uri", pa.string()),
        ("mask_uri", pa.string()),
        ("view_position", pa.string()),
        ("split", pa.string()),
        ("sex", pa.string()),
        ("age", pa.float64()),
        ("smoking", pa.float64()),
        ("support_devices", pa.float64()),
        ("pleural_effusion", pa.float64()),
        ("cardiomegaly", pa.float64()),
        ("phantom_index", pa.int64()),
        ("phantom_seed", pa.int64()),
    ]
)
MANIFEST_COLUMNS = tuple(MANIFEST_SCHEMA.names)

_DICOM_STREAM = 0xD1C0  # separates the file-encoding draws from the subject's own noise stream
_MANIFEST_CHUNK = 50_000
_EXTENSIONS = {"dicom": "dcm", "png": "png"}


# --------------------------------------------------------------------------------------------------------- storage
def _filesystem(out_uri: str, storage: StorageConfig | None):
    fs, root = fsspec_filesystem(out_uri, storage)
    return fs, root.rstrip("/")


def _uri(fs, path: str) -> str:
    """Absolute local path for local files, a full URL (s3://bucket/key) otherwise."""
    return path if isinstance(fs, LocalFileSystem) else fs.unstrip_protocol(path)


# ----------------------------------------------------------------------------------------------------------- DICOM
@dataclass(frozen=True)
class DicomEncoding:
    """How one phantom is stored in DICOM; varies across subjects like a real multi-vendor archive."""

    modality: str  # "DX" or "CR"
    photometric_interpretation: str  # "MONOCHROME1" stores inverted values (bright = low), "MONOCHROME2" not
    bits_stored: int  # 12 or 16, always in 16 allocated bits, unsigned
    rescale_slope: float
    rescale_intercept: float
    second_window: bool  # add a lung window after the full-range one (multi-valued WindowCenter/Width)

    @property
    def max_stored(self) -> int:
        return (1 << self.bits_stored) - 1


def dicom_encoding(config: PhantomConfig, index: int) -> DicomEncoding:
    """The file encoding of subject `index`, deterministic in (config.seed, index)."""
    rng = np.random.default_rng([config.seed, index, _DICOM_STREAM])
    u = rng.random(5)
    modality = "DX" if u[0] < 0.5 else "CR"
    slope, intercept = 1.0, 0.0
    if modality == "CR":
        slope, intercept = ((1.0, 0.0), (1.0, -1024.0), (0.5, 0.0))[int(u[3] * 3)]
    return DicomEncoding(
        modality=modality,
        photometric_interpretation="MONOCHROME1" if u[1] < config.monochrome1_fraction else "MONOCHROME2",
        bits_stored=12 if u[2] < 0.5 else 16,
        rescale_slope=slope,
        rescale_intercept=intercept,
        second_window=bool(u[4] < 0.25),
    )


def _ds(value: float) -> str:
    return f"{value:.10g}"  # a Decimal String holds at most 16 characters


def stored_values(image: np.ndarray, encoding: DicomEncoding) -> np.ndarray:
    """Quantise a [0, 1] MONOCHROME2 image to stored pixel values (inverted for MONOCHROME1)."""
    q = np.rint(np.clip(image.astype(np.float64), 0.0, 1.0) * encoding.max_stored).astype(np.uint16)
    if encoding.photometric_interpretation == "MONOCHROME1":
        q = (encoding.max_stored - q).astype(np.uint16)
    return q


def phantom_dicom(
    subject: Subject, image: np.ndarray, config: PhantomConfig, encoding: DicomEncoding | None = None
) -> Dataset:
    """A valid DICOM dataset (with file meta) of a rendered phantom; hidden metadata is left out of it too.

    Decoding: modality value = slope * stored + intercept; (value - intercept) / (slope * max_stored) is the image,
    inverted for MONOCHROME1. The first window spans the whole stored range exactly.
    """
    enc = encoding or dicom_encoding(config, subject.index)
    if image.ndim != 2:
        raise ValueError(f"phantom_dicom takes a 2-D grayscale image, got shape {image.shape}")
    rows, cols = image.shape
    missing = PhantomSCM(config).missing_mask(subject)
    entropy = ["cfgen-phantom", str(config.seed), str(subject.index)]
    sop_class = DIGITAL_XRAY_FOR_PRESENTATION if enc.modality == "DX" else COMPUTED_RADIOGRAPHY
    sop_instance = generate_uid(entropy_srcs=[*entropy, "instance"])
    study_date = (_dt.date(2020, 1, 1) + _dt.timedelta(days=subject.index % 1461)).strftime("%Y%m%d")

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID

    ds = Dataset()
    ds.file_meta = meta
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_instance
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = study_date
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
    ds.AccessionNumber = ""
    ds.Modality = enc.modality
    ds.Manufacturer = "cfgen phantom"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "PHANTOM CHEST"
    ds.SeriesDescription = f"CHEST {subject.view_position}"
    ds.PatientName = f"PHANTOM^{subject.subject_id}"
    ds.PatientID = subject.subject_id
    ds.PatientBirthDate = ""
    # PatientSex is type 2 (present, may be empty); PatientAge is type 3 and is left out when hidden
    ds.PatientSex = "" if missing["sex"] else subject.sex
    if not missing["age"]:
        ds.PatientAge = f"{subject.age:03d}Y"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = subject.view_position
    ds.StudyInstanceUID = generate_uid(entropy_srcs=[*entropy, "study"])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[*entropy, "series"])
    ds.StudyID = subject.subject_id
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.PatientOrientation = ["L", "F"]  # PA display: rows run to the patient's left, columns to the feet
    spacing = _ds(DETECTOR_PIXEL_SPACING_MM * 2048 / max(rows, cols))
    ds.ImagerPixelSpacing = [spacing, spacing]
    ds.PixelSpacing = [spacing, spacing]
    if enc.modality == "DX":
        ds.PresentationIntentType = "FOR PRESENTATION"
        ds.PresentationLUTShape = "INVERSE" if enc.photometric_interpretation == "MONOCHROME1" else "IDENTITY"
    ds.PixelIntensityRelationship = "LOG"
    # +1: lower stored values mean less beam, i.e. more attenuation; true when dense tissue is stored low
    ds.PixelIntensityRelationshipSign = 1 if enc.photometric_interpretation == "MONOCHROME1" else -1
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"

    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = enc.photometric_interpretation
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated = 16
    ds.BitsStored = enc.bits_stored
    ds.HighBit = enc.bits_stored - 1
    ds.PixelRepresentation = 0
    ds.RescaleSlope = _ds(enc.rescale_slope)
    ds.RescaleIntercept = _ds(enc.rescale_intercept)
    ds.RescaleType = "US"

    # Windows act on modality values. Linear VOI maps c - 0.5 -/+ (w - 1)/2 to the output range, so this pair
    # maps [lo, hi] exactly onto it.
    lo = enc.rescale_intercept
    hi = enc.rescale_intercept + enc.rescale_slope * enc.max_stored
    centers, widths, names = [(lo + hi) / 2 + 0.5], [hi - lo + 1], ["FULL"]
    if enc.second_window:
        lung = 0.25 if enc.photometric_interpretation == "MONOCHROME2" else 0.75
        centers.append(lo + lung * (hi - lo))
        widths.append(0.5 * (hi - lo))
        names.append("LUNG")
    ds.WindowCenter = [_ds(c) for c in centers] if len(centers) > 1 else _ds(centers[0])
    ds.WindowWidth = [_ds(w) for w in widths] if len(widths) > 1 else _ds(widths[0])
    ds.WindowCenterWidthExplanation = names if len(names) > 1 else names[0]
    ds.VOILUTFunction = "LINEAR"
    ds.PixelData = stored_values(image, enc).astype("<u2").tobytes()
    return ds


def dicom_bytes(ds: Dataset) -> bytes:
    """A DICOM Part 10 file (preamble, DICM, file meta, dataset) as bytes."""
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


# ------------------------------------------------------------------------------------------------------------- PNG
def png_bytes(image: np.ndarray, bit_depth: int = 16) -> bytes:
    """A grayscale PNG of a [0, 1] image: 16-bit (PIL mode I;16) keeps the subtle planted effects intact."""
    if bit_depth == 16:
        pixels = np.rint(np.clip(image, 0, 1) * 65535.0).astype(np.uint16)
    elif bit_depth == 8:
        pixels = np.rint(np.clip(image, 0, 1) * 255.0).astype(np.uint8)
    else:
        raise ValueError(f"PNG bit depth must be 8 or 16, got {bit_depth}")
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def mask_png_bytes(mask: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray((mask > 0).astype(np.uint8) * 255, mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


# ----------------------------------------------------------------------------------------------------------- write
def _formats(config: PhantomConfig) -> list[str]:
    formats = list(dict.fromkeys(config.formats))
    if not formats:
        raise ValueError("phantoms.formats is empty: choose 'dicom', 'png' or both")
    return formats


def manifest_row(
    scm: PhantomSCM, subject: Subject, image_id: str, image_uri: str, mask_uri: str
) -> dict[str, Any]:
    """One manifest row; attributes the SCM hides are None (an empty CSV cell, a Parquet null)."""
    hidden = scm.missing_mask(subject)
    attrs = subject.attributes()

    def shown(name: str, value: Any) -> Any:
        return None if hidden[name] else value

    return {
        "image_id": image_id,
        "patient_id": subject.subject_id,
        "study_id": f"{subject.subject_id}-S1",
        "image_uri": image_uri,
        "mask_uri": mask_uri,
        "view_position": subject.view_position,
        "split": scm.split(subject),
        "sex": shown("sex", attrs["sex"]),
        "age": shown("age", float(attrs["age"])),
        **{name: shown(name, float(attrs[name])) for name in
           ("smoking", "support_devices", "pleural_effusion", "cardiomegaly")},
        "phantom_index": subject.index,
        "phantom_seed": scm.config.seed,
    }


def _write_subject(scm: PhantomSCM, fs, root: str, index: int, formats: list[str]) -> list[dict[str, Any]]:
    config = scm.config
    subject = scm.subject(index)
    image, lung_mask = render(subject, config.size, config.effects)
    mask_path = f"{root}/masks/{subject.subject_id}.png"
    fs.pipe_file(mask_path, mask_png_bytes(lung_mask))
    rows = []
    for fmt in formats:
        path = f"{root}/images/{subject.subject_id}.{_EXTENSIONS[fmt]}"
        if fmt == "dicom":
            data = dicom_bytes(phantom_dicom(subject, image, config))
        else:
            data = png_bytes(image, config.png_bit_depth)
        fs.pipe_file(path, data)
        # with several formats each file is its own image; the suffix keeps image_id unique
        image_id = subject.subject_id if len(formats) == 1 else f"{subject.subject_id}_{fmt}"
        rows.append(manifest_row(scm, subject, image_id, _uri(fs, path), _uri(fs, mask_path)))
    return rows


def write_phantom_shard(
    config: PhantomConfig,
    out_uri: str,
    start: int,
    stop: int,
    storage: StorageConfig | None = None,
    max_workers: int = 8,
) -> list[dict[str, Any]]:
    """Render and write subjects start..stop-1; returns their manifest rows in index order."""
    if not 0 <= start <= stop:
        raise ValueError(f"a shard needs 0 <= start <= stop, got start={start}, stop={stop}")
    formats = _formats(config)
    scm = PhantomSCM(config)
    fs, root = _filesystem(out_uri, storage)
    for folder in ("images", "masks"):
        fs.makedirs(f"{root}/{folder}", exist_ok=True)
    workers = max(1, min(max_workers, stop - start))
    rows: list[dict[str, Any]] = []
    # threads overlap storage round trips; numpy releases the GIL for most of the rendering
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for subject_rows in pool.map(lambda i: _write_subject(scm, fs, root, i, formats), range(start, stop)):
            rows.extend(subject_rows)
    return rows


def write_manifest(
    rows: Iterable[dict[str, Any]], out_uri: str, storage: StorageConfig | None = None
) -> dict[str, str]:
    """Write manifest.csv (hidden cells empty) and manifest.parquet (hidden cells null), in chunks."""
    rows = list(rows)
    fs, root = _filesystem(out_uri, storage)
    fs.makedirs(root, exist_ok=True)
    csv_path, parquet_path = f"{root}/manifest.csv", f"{root}/manifest.parquet"
    chunks = [rows[i : i + _MANIFEST_CHUNK] for i in range(0, len(rows), _MANIFEST_CHUNK)] or [[]]
    with fs.open(parquet_path, "wb") as f, pq.ParquetWriter(f, MANIFEST_SCHEMA) as writer:
        for chunk in chunks:
            writer.write_table(pa.Table.from_pylist(chunk, schema=MANIFEST_SCHEMA))
    with fs.open(csv_path, "wb") as f:
        for i, chunk in enumerate(chunks):
            table = pa.Table.from_pylist(chunk, schema=MANIFEST_SCHEMA)
            frame = table.to_pandas()
            f.write(frame.to_csv(index=False, header=(i == 0), lineterminator="\n").encode())
    return {"manifest_csv": _uri(fs, csv_path), "manifest_parquet": _uri(fs, parquet_path)}


def write_phantoms(
    config: PhantomConfig, out_uri: str, storage: StorageConfig | None = None, start: int = 0
) -> dict[str, Any]:
    """Render subjects start..start+config.n-1 with images, masks, manifest and the config to `out_uri`."""
    rows = write_phantom_shard(config, out_uri, start, start + config.n, storage)
    manifest = finish_phantoms(config, rows, out_uri, storage)
    return {"out_uri": out_uri, "n_subjects": config.n, "n_images": len(rows), "start": start, **manifest}


def finish_phantoms(
    config: PhantomConfig, rows: Iterable[dict[str, Any]], out_uri: str, storage: StorageConfig | None = None
) -> dict[str, str]:
    """After the shards: the manifest, and the config that re-renders every true counterfactual later (the seed
    alone is not enough: effects and prevalences shape the images)."""
    manifest = write_manifest(rows, out_uri, storage)
    fs, root = _filesystem(out_uri, storage)
    fs.pipe_file(f"{root}/phantom_config.json", (config.model_dump_json(indent=2) + "\n").encode())
    return manifest
