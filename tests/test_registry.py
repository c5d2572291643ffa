"""The family registry: families are found in networks/, and core code (trtnet/) never names one."""

from __future__ import annotations

import ast
from pathlib import Path
from types import ModuleType

import pytest

from trtnet import networks
from trtnet.errors import TrtnetError

ROOT = Path(__file__).resolve().parents[1]
FAMILY_WORDS = ("yolov5", "yolov8", "yolo11", "resnet")


def core_modules() -> list[Path]:
    return sorted((ROOT / "trtnet").rglob("*.py"))


def docstring_nodes(tree: ast.AST) -> set[int]:
    nodes = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                nodes.add(id(first.value))
    return nodes


def family_imports(tree: ast.AST) -> list[str]:
    """`trtnet.networks.<module>` imports (the registry package itself is fine)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("trtnet.networks"):
            found += [node.module] if node.module != "trtnet.networks" else [f"trtnet.networks.{a.name}"
                                                                             for a in node.names]
        elif isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.startswith("trtnet.networks.")]
    registry = {f"trtnet.networks.{name}" for name, value in vars(networks).items()
                if not name.startswith("_") and not isinstance(value, ModuleType)}
    return [name for name in found if name not in registry]


def family_words_in_code(tree: ast.AST) -> list[str]:
    """Family names as string values (not docstrings, not help text with other words) and as identifiers."""
    skip = docstring_nodes(tree)
    hits = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip \
                and node.value.lower() in FAMILY_WORDS:
            hits.append(f"line {node.lineno}: {node.value!r}")
        name = node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else \
            node.name if isinstance(node, (ast.FunctionDef, ast.ClassDef)) else None
        if name and any(word in name.lower() for word in FAMILY_WORDS):
            hits.append(f"line {node.lineno}: {name}")
    return hits


def import_graph() -> dict[str, list[str]]:
    """trtnet/* module → the specific family modules it imports (the before/after picture of issue 12)."""
    graph = {}
    for path in core_modules():
        imports = family_imports(ast.parse(path.read_text(encoding="utf-8")))
        if imports:
            graph[str(path.relative_to(ROOT))] = imports
    return graph


def test_the_registry_lists_the_families_of_networks():
    assert set(networks.families()) >= {"yolov5", "resnet"}
    assert networks.family("yolov5").TASK == "detect"
    assert networks.family("resnet").TASK == "classify"
    assert "yolov5" in networks.of_task("detect") and "resnet" in networks.of_task("classify")


def test_every_family_module_has_the_required_names():
    for name, module in networks.families().items():
        assert name == module.FAMILY
        for attr in ("TASK", "INPUT", "DEFAULT_IMGSZ", "read_checkpoint", "define"):
            assert hasattr(module, attr), f"{module.__name__} lacks {attr}"
        if module.TASK == "detect":
            assert callable(module.postprocess_kwargs)


def test_an_unknown_family_names_the_known_ones():
    with pytest.raises(TrtnetError, match="unknown model family 'yolov9'") as family:
        networks.for_meta({"family": "yolov9"})
    assert "yolov5" in str(family.value) and "resnet" in str(family.value)
    with pytest.raises(TrtnetError, match="unknown architecture 'resnet9'") as arch:
        networks.meta_for_arch("resnet9")
    assert "yolov5s" in str(arch.value) and "resnet50" in str(arch.value)


def test_arch_tables_come_from_the_families():
    assert networks.meta_for_arch("resnet34")["family"] == "resnet"
    meta = networks.meta_for_arch("yolov5s", nc=3)
    assert meta["family"] == "yolov5" and meta["nc"] == 3 and len(meta["anchors"]) == 3


def test_the_model_classes_a_checkpoint_may_name_come_from_the_families(tmp_path, monkeypatch):
    """The unpickler records model classes (never imports them) only from torch.nn and the modules a family
    declares in PICKLED_MODULES: a fourth family with its own model code adds its prefix in its own module."""
    from tests import hostile
    from trtnet.safe_pickle import ModuleRecord, load_pickle

    path = hostile.write_zip(tmp_path / "yolox.pt", {"model": hostile.Record("yolox.models.yolox.YOLOX", {})})
    assert {"ultralytics.", "torchvision.models."} <= set(networks.pickled_modules())
    with pytest.raises(TrtnetError, match="its pickle calls yolox.models.yolox.YOLOX, which is not allowed"):
        load_pickle(path)
    fourth = ModuleType("yolox_family")
    fourth.PICKLED_MODULES = ("yolox.",)
    known = networks.families()
    monkeypatch.setattr(networks, "families", lambda: {**known, "yolox": fourth})
    model = load_pickle(path)["model"]
    assert isinstance(model, ModuleRecord) and model.qualname == "yolox.models.yolox.YOLOX"


def test_no_core_module_imports_a_family_module():
    assert import_graph() == {}


def test_no_core_module_names_a_family_in_code():
    named = {str(p.relative_to(ROOT)): hits for p in core_modules()
             if (hits := family_words_in_code(ast.parse(p.read_text(encoding="utf-8"))))}
    assert named == {}


def test_the_checks_find_what_they_look_for():
    tree = ast.parse('"""yolov5 in a docstring is fine."""\nfrom trtnet.networks import yolov5\n'
                     'if meta["family"] == "resnet":\n    load_yolov5()\n')
    assert family_imports(tree) == ["trtnet.networks.yolov5"]
    assert family_words_in_code(tree) == ["line 3: 'resnet'", "line 4: load_yolov5"]


if __name__ == "__main__":  # `python tests/test_registry.py`: print the graph (issue 12's before/after picture)
    graph = import_graph()
    for module, imports in graph.items():
        print(f"{module} → {', '.join(imports)}")
    if not graph:
        print("no trtnet/ module imports a family module")
