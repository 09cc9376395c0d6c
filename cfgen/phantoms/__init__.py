"""Phantom chest X-rays from a structural causal model, with true counterfactuals (DESIGN.md §3)."""

from cfgen.phantoms.render import render, render_regions
from cfgen.phantoms.scm import BINARY_ATTRIBUTES, ExogenousNoise, PhantomSCM, Subject, subject_id
from cfgen.phantoms.writers import (
    MANIFEST_COLUMNS,
    MANIFEST_SCHEMA,
    DicomEncoding,
    dicom_bytes,
    dicom_encoding,
    finish_phantoms,
    manifest_row,
    phantom_dicom,
    png_bytes,
    write_manifest,
    write_phantom_shard,
    write_phantoms,
)


def render_counterfactual(scm: PhantomSCM, subject: Subject, intervention: dict, size: int | None = None):
    """The true counterfactual image and lung mask: render(scm.intervene(subject, intervention))."""
    return scm.render_counterfactual(subject, intervention, size)


__all__ = [
    "BINARY_ATTRIBUTES",
    "MANIFEST_COLUMNS",
    "MANIFEST_SCHEMA",
    "DicomEncoding",
    "ExogenousNoise",
    "PhantomSCM",
    "Subject",
    "dicom_bytes",
    "dicom_encoding",
    "finish_phantoms",
    "manifest_row",
    "phantom_dicom",
    "png_bytes",
    "render",
    "render_counterfactual",
    "render_regions",
    "subject_id",
    "write_manifest",
    "write_phantom_shard",
    "write_phantoms",
]
