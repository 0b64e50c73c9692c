"""The product's imports follow the layers of docs/DESIGN.md ("Layers").

The checker (tests/architecture/layers.py) is proved on small fake trees
written here, so a green run on the real tree means "no breach", not "the
checker saw nothing".
"""

from __future__ import annotations

from pathlib import Path

from tests.architecture import layers

REPO = Path(__file__).resolve().parents[2]


def write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def fake_tree(tmp_path: Path, extra: dict[str, str] | None = None) -> Path:
    """A minimal product tree that follows every rule, with ``extra`` files added or replaced."""
    base = {
        "statefsd/__init__.py": '__version__ = "0"\n',
        "statefsd/errors.py": "",
        "statefsd/shared/__init__.py": "",
        "statefsd/shared/signing.py": "from statefsd.errors import InvalidArgument\n",
        "statefsd/storage/__init__.py": "",
        "statefsd/storage/format.py": "from statefsd.errors import FormatError\n",
        "statefsd/storage/replay.py": "from statefsd.shared.signing import verify_signature\n",
        "statefsd/testing/__init__.py": "",
        "statefsd/testing/selftest.py": "",
        "keystored/__init__.py": "",
        "keystored/domain.py": "from statefsd.shared.signing import check_label\n",
        "fsck_statefs/__init__.py": "",
        "fsck_statefs/check.py": "from statefsd.storage import replay\n",
    }
    return write(tmp_path, base | (extra or {}))


def replay_breach(line: int, target: str) -> str:
    """The whole report of statefsd/storage/replay.py importing ``target`` at ``line``."""
    return (f"statefsd/storage/replay.py:{line}: statefsd.storage.replay imports {target}; "
            "statefsd.storage may import only statefsd.errors, statefsd.shared, statefsd.storage "
            '(docs/DESIGN.md, "Layers")')


def test_every_product_import_follows_the_layers():
    found = layers.breaches(REPO)
    assert not found, "imports that break the layering:\n" + "\n".join(found)


def test_the_checker_reads_all_three_product_packages_and_finds_a_known_import():
    files = {str(p.relative_to(REPO)) for p in layers.product_files(REPO)}
    assert {"statefsd/storage/replay.py", "keystored/domain.py", "fsck_statefs/check.py"} <= files
    seen = layers.imports(REPO)
    assert any(i.source == "statefsd.storage.replay" and i.target == "statefsd.shared.signing"
               for i in seen)


def test_each_declared_exception_is_still_needed():
    seen = layers.imports(REPO)
    for allowance in layers.EXCEPTIONS:
        assert any(layers.excused(i, (allowance,)) for i in seen), (
            f"{allowance.source} no longer imports {allowance.target} inside "
            f"{allowance.function}(): drop the exception from tests/architecture/layers.py")


def test_a_clean_fake_tree_has_no_breach(tmp_path):
    assert layers.breaches(fake_tree(tmp_path)) == []


def test_a_storage_module_importing_keystored_is_reported_with_file_line_and_import(tmp_path):
    root = fake_tree(tmp_path, {"statefsd/storage/replay.py":
                                "import hashlib\n\nfrom keystored.domain import verify\n"})
    assert layers.breaches(root) == [replay_breach(3, "keystored.domain")]


def test_an_import_inside_a_function_is_checked(tmp_path):
    root = fake_tree(tmp_path, {"statefsd/storage/replay.py": "def f():\n    import fsck_statefs.check\n"})
    assert layers.breaches(root) == [replay_breach(2, "fsck_statefs.check")]


def test_a_relative_import_is_resolved_before_it_is_checked(tmp_path):
    root = fake_tree(tmp_path, {"statefsd/storage/replay.py": "from ..testing import selftest\n"})
    [found] = layers.breaches(root)
    assert found.startswith("statefsd/storage/replay.py:1: statefsd.storage.replay imports "
                            "statefsd.testing.selftest;")


def test_an_import_by_name_through_importlib_is_checked(tmp_path):
    root = fake_tree(tmp_path, {"keystored/domain.py":
                                "import importlib\nm = importlib.import_module('fsck_statefs.check')\n"})
    [found] = layers.breaches(root)
    assert found.startswith("keystored/domain.py:2: keystored.domain imports fsck_statefs.check;")


def test_keystored_may_be_imported_only_by_the_keystore_adapter(tmp_path):
    root = fake_tree(tmp_path, {"statefsd/keystore.py": "from keystored.client import KeystoreClient\n",
                                "statefsd/server.py": "from keystored.client import KeystoreClient\n"})
    [found] = layers.breaches(root)
    assert found.startswith("statefsd/server.py:1: statefsd.server imports keystored.client;")


def test_the_product_never_imports_the_tests_even_from_the_test_rig(tmp_path):
    root = fake_tree(tmp_path, {"statefsd/testing/selftest.py": "from tests.format import spec_reader\n"})
    [found] = layers.breaches(root)
    assert found.startswith("statefsd/testing/selftest.py:1: statefsd.testing.selftest imports tests.format;")


def test_the_daemon_may_load_the_selftest_only_inside_main(tmp_path):
    inside = "def main():\n    from statefsd.testing import selftest\n"
    assert layers.breaches(fake_tree(tmp_path / "a", {"statefsd/daemon.py": inside})) == []
    outside = "from statefsd.testing import selftest\n"
    [found] = layers.breaches(fake_tree(tmp_path / "b", {"statefsd/daemon.py": outside}))
    assert found.startswith("statefsd/daemon.py:1: statefsd.daemon imports statefsd.testing.selftest;")


def test_a_module_outside_every_layer_is_reported(tmp_path):
    root = fake_tree(tmp_path, {"statefsd/mirror.py": ""})
    assert layers.breaches(root) == [
        'statefsd/mirror.py:1: statefsd.mirror belongs to no layer: give it a rule in '
        'tests/architecture/layers.py and a line in docs/DESIGN.md ("Layers")']
