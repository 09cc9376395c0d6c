"""The shape of cfgen.io: imports point one way, from the reader down to the schema, and each format family of the
decoder stands on its own. Read from the source with `ast`, so imports inside functions count as well."""

from __future__ import annotations

import ast
from pathlib import Path

import cfgen.io

IO = Path(cfgen.io.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(IO.parent.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(path): path for path in sorted(IO.rglob("*.py"))}


def _imports(path: Path) -> set[str]:
    """Every module `path` imports, anywhere in the file (`from cfgen.io import adapters` names cfgen.io.adapters)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names
                         if f"{node.module}.{alias.name}" in MODULES)
    return found


GRAPH = {name: {m for m in _imports(path) if m in MODULES and m != name} for name, path in MODULES.items()}


def _reaches(start: str, goal: str) -> bool:
    seen, stack = set(), [start]
    while stack:
        for nxt in GRAPH[stack.pop()] - seen:
            if nxt == goal:
                return True
            seen.add(nxt)
            stack.append(nxt)
    return False


def test_no_module_of_cfgen_io_imports_itself_through_others():
    cycles = [name for name in GRAPH if _reaches(name, name)]
    assert cycles == []


def test_manifest_layers_point_down_from_the_reader_to_the_schema():
    assert GRAPH["cfgen.io.schema"] & {"cfgen.io.adapters", "cfgen.io.manifest", "cfgen.io.tables"} == set()
    assert "cfgen.io.manifest" not in GRAPH["cfgen.io.adapters"]
    assert {"cfgen.io.schema", "cfgen.io.tables"} <= GRAPH["cfgen.io.adapters"]
    assert "cfgen.io.adapters" in GRAPH["cfgen.io.manifest"]
    for user in ("cfgen.io.splits", "cfgen.io.prompts"):  # they need the columns, not the reader
        assert "cfgen.io.manifest" not in GRAPH[user]


def test_each_decoder_format_family_has_its_own_module():
    package = "cfgen.io.decode"
    parts = {name for name in MODULES if name.startswith(package + ".")}
    assert {f"{package}.{m}" for m in ("dicom", "raster", "codestreams", "grayscale")} <= parts
    for name in parts:
        assert package not in GRAPH[name], f"{name} imports the package that dispatches to it"
    assert f"{package}.raster" not in GRAPH[f"{package}.dicom"]
    assert f"{package}.dicom" not in GRAPH[f"{package}.raster"]
    for leaf in ("codestreams", "image", "elements"):  # bytes and numbers only, no cfgen module below them
        assert GRAPH[f"{package}.{leaf}"] == set()


def test_io_knows_nothing_of_models_ray_or_the_pipeline():
    upward = ("cfgen.pipeline", "cfgen.models", "cfgen.train", "cfgen.editing", "cfgen.serve", "ray", "torch")
    offenders = {name: sorted(m for m in _imports(path) if m.startswith(upward))
                 for name, path in MODULES.items()}
    assert {name: found for name, found in offenders.items() if found} == {}


def test_every_name_the_old_decode_and_manifest_modules_offered_is_still_importable():
    from cfgen.io import decode, manifest

    for name in ("decode_image", "decode_dicom", "decode_png", "decode_jpeg", "sniff_format", "DecodeError",
                 "DecodedImage", "REASONS", "MAX_PIXELS", "new_provenance", "window", "luminance"):
        assert hasattr(decode, name), name
    for name in manifest.__all__:
        assert hasattr(manifest, name), name
