"""Build the QEMU guest: a Debian kernel plus an initramfs that carries Python and StateFS.

Run with the project's venv:  .venv/bin/python qemu/build_guest.py [--force] [--json]

Outputs (in qemu/build/, gitignored):
  vmlinux      uncompressed kernel (QEMU boots it through its PVH entry: ~3.5 s faster under TCG)
  initrd.cpio  uncompressed cpio (faster to unpack than gzip under TCG) = base.cpio + app.cpio
  guest.json   what was built: kernel version, sizes, input hashes

The initramfs is two concatenated cpio archives (the kernel unpacks both in order):
  base.cpio  busybox, kernel modules, the host's Python interpreter with its shared libraries
             at the same prefix (the interpreter finds its stdlib at its compile-time prefix),
             a pruned stdlib, and the site-packages of the project's runtime dependencies.
             Rebuilt only when this script, the kernel package or the dependency set changes.
  app.cpio   /init, the guest program and the project's packages. Rebuilt when any of their
             files change, which is often, so it must stay small and quick.

Every .py file ships with an unchecked-hash .pyc compiled on the host: the guest never compiles
and never checks mtimes, which matters under TCG where compiling the stdlib takes seconds.
Nothing is downloaded except through apt (the kernel and the tools) and PyPI (the venv).
"""

from __future__ import annotations

import argparse
import ast
import compileall
import fcntl
import hashlib
import importlib.metadata
import json
import lzma
import os
import py_compile
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parent.parent
BUILD = REPO / "qemu" / "build"
GUEST_SRC = REPO / "qemu" / "guest"
PROJECT_PACKAGES = ("statefsd", "keystored", "fsck_statefs")

# Debian package -> a file that proves it is installed.
TOOLS = {
    "qemu-system-x86": "/usr/bin/qemu-system-x86_64",
    "qemu-utils": "/usr/bin/qemu-img",
    "busybox-static": "/bin/busybox",
    "cpio": "/usr/bin/cpio",
    "xz-utils": "/usr/bin/xz",
    "binutils": "/usr/bin/strip",
    "e2fsprogs": "/usr/sbin/mkfs.ext4",  # the guest's key disk: mkfs.ext4 makes it, debugfs reads it
}

# Kernel modules the guest loads; their dependencies are added from each module's modinfo.
# ext4 + crc32c: the state disk /dev/vdb that keeps keystored's keys across boots.
GUEST_MODULES = ("virtio_pci", "virtio_blk", "virtio_rng", "ext4", "crc32c_generic")

# Stdlib parts no guest program imports: tests, GUI, packaging tools, docs data.
STDLIB_SKIP_DIRS = {
    "test", "idlelib", "tkinter", "turtledemo", "ensurepip", "lib2to3", "pydoc_data",
    "distutils", "unittest", "sqlite3", "dbm", "curses", "site-packages", "__pycache__",
    "venv", "msilib", "xmlrpc", "wsgiref",
}
STDLIB_SKIP_PREFIXES = ("config-",)  # config-3.11-x86_64-linux-gnu: static lib + Makefile
STDLIB_SKIP_FILES = {"turtle.py", "pydoc.py", "doctest.py", "tabnanny.py", "this.py"}
DYNLOAD_SKIP = re.compile(r"^(_test|_tkinter|_ctypes_test|xxlimited|xxsubtype|_xxtestfuzz|"
                          r"_sqlite3|_dbm|_gdbm|_curses|readline|nis|ossaudiodev|spwd|_crypt)")
# What a guest program cannot import because of the pruning above.
PRUNED_MODULES = ((STDLIB_SKIP_DIRS - {"site-packages", "__pycache__"})
                  | {f.removesuffix(".py") for f in STDLIB_SKIP_FILES}
                  | {"readline", "nis", "ossaudiodev", "spwd", "crypt"})


def log(msg: str) -> None:
    print(f"build_guest: {msg}", file=sys.stderr, flush=True)


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=True, **kw)


# ---------------------------------------------------------------- host tools

def ensure_tools() -> None:
    """apt-get install whatever is missing; apt-get update only when something is."""
    missing = [pkg for pkg, probe in TOOLS.items() if not os.path.exists(probe)]
    if not missing:
        return
    log(f"installing {' '.join(missing)}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    run(["apt-get", "update", "-qq"], env=env)
    run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing], env=env)


def kernel_package() -> str:
    """The versioned package linux-image-amd64 currently points at (never -cloud).

    apt-cache takes over a second here (no pkgcache), so the answer is remembered
    until apt's package lists change.
    """
    lists = sorted(Path("/var/lib/apt/lists").glob("*_Packages*"))
    stamp = digest(*[f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in lists])
    memo = BUILD / "kernel-package.json"
    try:
        saved = json.loads(memo.read_text())
        if saved["lists"] == stamp:
            return saved["package"]
    except (OSError, ValueError, KeyError):
        pass
    name = lookup_kernel_package()
    memo.write_text(json.dumps({"lists": stamp, "package": name}) + "\n")
    return name


def lookup_kernel_package() -> str:
    def lookup() -> str | None:
        out = subprocess.run(["apt-cache", "depends", "linux-image-amd64"],
                             capture_output=True, text=True).stdout
        names = re.findall(r"Depends:\s*(linux-image-[0-9][\w.+-]*-amd64)\b", out)
        names = [n for n in names if "cloud" not in n]
        return names[0] if names else None

    name = lookup()
    if name is None:  # no package lists yet
        run(["apt-get", "update", "-qq"])
        name = lookup()
    if name is None:
        raise SystemExit("build_guest: cannot find the kernel package behind linux-image-amd64")
    return name


# ---------------------------------------------------------------- kernel

def fetch_kernel(pkg: str) -> tuple[Path, str]:
    """Download the kernel .deb once; extract vmlinux and the guest's modules (cached per pkg)."""
    kdir = BUILD / "kernel" / pkg
    done = kdir / "version"
    if done.exists():
        return kdir, done.read_text().strip()
    debs = BUILD / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    deb = next(debs.glob(f"{pkg}_*.deb"), None)
    if deb is None:
        log(f"downloading {pkg}")
        download = ["apt-get", "download", "-q", "-o", "APT::Sandbox::User=root", pkg]
        if subprocess.run(download, cwd=debs).returncode != 0:
            run(["apt-get", "update", "-qq"])  # stale lists point at a removed version
            run(download, cwd=debs)
        deb = next(debs.glob(f"{pkg}_*.deb"))

    shutil.rmtree(kdir, ignore_errors=True)
    with tempfile.TemporaryDirectory(dir=BUILD) as tmp:
        tar = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE)
        run(["tar", "-x", "-C", tmp, "--wildcards", "./boot/vmlinuz-*", "./lib/modules/*"],
            stdin=tar.stdout)
        if tar.wait() != 0:
            raise SystemExit(f"build_guest: dpkg-deb failed on {deb}")
        vmlinuz = next(Path(tmp, "boot").glob("vmlinuz-*"))
        version = vmlinuz.name.removeprefix("vmlinuz-")
        kdir.mkdir(parents=True)
        (kdir / "vmlinux").write_bytes(decompress_vmlinuz(vmlinuz.read_bytes()))
        select_modules(Path(tmp, "lib/modules", version), kdir / "modules" / version)
    done.write_text(version + "\n")
    return kdir, version


def decompress_vmlinuz(image: bytes) -> bytes:
    """The bzImage embeds an xz stream; its payload is the ELF vmlinux."""
    start = image.find(b"\xfd7zXZ\x00")
    if start < 0:
        raise SystemExit("build_guest: no xz stream in vmlinuz")
    elf = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(image[start:])
    if not elf.startswith(b"\x7fELF"):
        raise SystemExit("build_guest: vmlinuz payload is not an ELF image")
    return elf


def select_modules(src: Path, dst: Path) -> None:
    """Copy GUEST_MODULES and their dependency closure, uncompressed, plus the builtin lists."""
    index: dict[str, Path] = {}
    for ko in src.rglob("*.ko*"):
        index[ko.name.split(".ko")[0].replace("-", "_")] = ko
    builtin = {Path(line).name.split(".ko")[0].replace("-", "_")
               for line in (src / "modules.builtin").read_text().split()}

    wanted, todo = set(), list(GUEST_MODULES)
    while todo:
        name = todo.pop()
        if name in wanted or name in builtin:
            continue
        if name not in index:
            raise SystemExit(f"build_guest: kernel module {name} not found")
        wanted.add(name)
        data = read_module(index[name])
        deps = re.search(rb"(?:^|\0)depends=([^\0]*)\0", data)
        if deps and deps.group(1):
            todo.extend(d.decode().replace("-", "_") for d in deps.group(1).split(b","))

    for name in sorted(wanted):
        rel = index[name].relative_to(src)
        out = dst / str(rel).split(".ko")[0]
        out = out.with_name(out.name + ".ko")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(read_module(index[name]))
    for extra in ("modules.builtin", "modules.order", "modules.builtin.modinfo"):
        if (src / extra).exists():
            shutil.copy2(src / extra, dst / extra)
    log(f"kernel modules: {' '.join(sorted(wanted))}")


def read_module(path: Path) -> bytes:
    data = path.read_bytes()
    return lzma.decompress(data) if path.name.endswith(".xz") else data


# ---------------------------------------------------------------- python

def runtime_distributions() -> list[importlib.metadata.Distribution]:
    """The project's [project].dependencies and all they require, as installed in the venv."""
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    found: dict[str, importlib.metadata.Distribution] = {}
    todo = [Requirement(d) for d in deps]
    while todo:
        req = todo.pop()
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        key = re.sub(r"[-_.]+", "-", req.name).lower()
        if key in found:
            continue
        try:
            dist = importlib.metadata.distribution(req.name)
        except importlib.metadata.PackageNotFoundError:
            raise SystemExit(f"build_guest: {req.name} is not installed in the venv "
                             f"({sys.prefix}); pip install it first") from None
        found[key] = dist
        todo.extend(Requirement(r) for r in dist.requires or [])
    return sorted(found.values(), key=lambda d: d.metadata["Name"].lower())


def host_paths() -> dict[str, Path]:
    """The base interpreter's stdlib and site-packages (not the venv's)."""
    base = {"base": sys.base_prefix, "platbase": sys.base_prefix,
            "installed_base": sys.base_prefix, "installed_platbase": sys.base_prefix}
    return {k: Path(v) for k, v in sysconfig.get_paths(vars=base).items()}


def copy_stdlib(root: Path) -> Path:
    """Copy the pruned stdlib; return where it landed under root."""
    stdlib = host_paths()["stdlib"]
    for dirpath, dirnames, filenames in os.walk(stdlib):
        rel = Path(dirpath).relative_to(stdlib)
        dirnames[:] = sorted(d for d in dirnames if d not in STDLIB_SKIP_DIRS
                             and not (rel == Path(".") and d.startswith(STDLIB_SKIP_PREFIXES)))
        for f in filenames:
            if f.endswith((".pyc", ".exe")) or (rel == Path(".") and f in STDLIB_SKIP_FILES):
                continue
            if rel == Path("lib-dynload") and DYNLOAD_SKIP.match(f):
                continue
            copy_to(root, Path(dirpath, f))
    return root / stdlib.relative_to("/")


def drop_stdlib_sources(stdlib: Path) -> None:
    """Ship the stdlib as bytecode only: its .py files would double its size (and the boot's
    unpack time) and serve only for source lines in tracebacks. Each compiled module moves
    from __pycache__/m.cpython-311.pyc to m.pyc, where the sourceless loader finds it.
    Site-packages and the project keep their sources."""
    tag = sys.implementation.cache_tag
    for py in stdlib.rglob("*.py"):
        if "site-packages" in py.relative_to(stdlib).parts:
            continue
        pyc = py.parent / "__pycache__" / f"{py.stem}.{tag}.pyc"
        if pyc.exists():
            pyc.replace(py.with_suffix(".pyc"))
            py.unlink()
    for cache in stdlib.rglob("__pycache__"):
        if "site-packages" not in cache.relative_to(stdlib).parts and not any(cache.iterdir()):
            cache.rmdir()


def copy_interpreter(root: Path) -> Path:
    prefix = Path(sys.base_prefix)
    exe = prefix / "bin" / f"python{sys.version_info.major}.{sys.version_info.minor}"
    copy_to(root, exe)
    for link in ("python3", "python"):
        dst = root / exe.parent.relative_to("/") / link
        if not dst.exists():
            dst.symlink_to(exe.name)
    return exe  # libpython comes with the shared libraries ldd finds


def copy_site_packages(root: Path, site: Path) -> list[str]:
    names = []
    for dist in runtime_distributions():
        names.append(f"{dist.metadata['Name']}=={dist.version}")
        for f in dist.files or []:
            if f.parts[0] == ".." or "__pycache__" in f.parts or f.suffix == ".pyc":
                continue  # console scripts live in bin/; bytecode is rebuilt below
            src = Path(dist.locate_file(f))
            if src.is_file():
                dst = root / site.relative_to("/") / f
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dst)
    return names


def copy_to(root: Path, src: Path) -> None:
    """Copy a host file to the same absolute path under root (following symlinks)."""
    dst = root / src.relative_to("/")
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(src, dst, follow_symlinks=True)


def elf_files(root: Path) -> list[Path]:
    out = []
    for p in root.rglob("*"):
        if p.is_file() and not p.is_symlink():
            with p.open("rb") as fh:
                if fh.read(4) == b"\x7fELF":
                    out.append(p)
    return out


def copy_shared_libs(root: Path) -> None:
    """Every library ldd resolves for the ELF files under root, at its host path."""
    needed: set[str] = set()
    for elf in elf_files(root):
        out = subprocess.run(["ldd", str(elf)], capture_output=True, text=True).stdout
        for line in out.splitlines():
            m = re.search(r"(?:=>\s*)?(/\S+)\s+\(0x", line)
            if m:
                needed.add(m.group(1))
    for lib in sorted(needed):
        if not (root / lib.lstrip("/")).exists():
            copy_to(root, Path(lib))


def strip_elves(root: Path) -> None:
    """Debug info and static symbols: most of libpython's 23 MB and cryptography's 14 MB.
    Wheels repaired by auditwheel (numpy: a ``numpy.libs`` beside ``numpy``) are left
    alone: strip misaligns the load segments of their patched libraries, and the
    guest's loader then refuses them ("ELF load command ... not page-aligned")."""
    for elf in elf_files(root):
        if ".ko" not in elf.name and not _auditwheel_repaired(elf):
            subprocess.run(["strip", "--strip-unneeded", str(elf)], capture_output=True)


def _auditwheel_repaired(path: Path) -> bool:
    for parent in path.parents:
        if parent.name and (parent.name.endswith(".libs") or parent.with_name(parent.name + ".libs").is_dir()):
            return True
    return False


def compile_tree(root: Path, tree: Path) -> None:
    """unchecked-hash pycs: no mtime checks, no compiling in the guest; paths as in the guest."""
    ok = compileall.compile_dir(
        str(tree), quiet=1, workers=0, stripdir=str(root), prependdir="/",
        invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)
    if not ok:
        log(f"warning: some files under {tree} did not compile")


# ---------------------------------------------------------------- busybox + cpio

def install_busybox(root: Path) -> None:
    bb = root / "bin" / "busybox"
    bb.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2("/bin/busybox", bb)
    applets = subprocess.run(["/bin/busybox", "--list-full"], capture_output=True,
                             text=True, check=True).stdout.split()
    for applet in applets:
        dst = root / applet
        if dst.exists() or dst.is_symlink():
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.symlink_to(os.path.relpath("/bin/busybox", "/" + str(Path(applet).parent)))
    for d in ("dev", "proc", "sys", "tmp", "run", "etc"):
        (root / d).mkdir(exist_ok=True)


def write_cpio(root: Path, out: Path) -> None:
    names = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
    tmp = out.with_suffix(".tmp")
    with tmp.open("wb") as fh:
        run(["cpio", "--quiet", "-o", "-H", "newc", "-R", "0:0", "--reproducible"],
            cwd=root, input="\n".join(names).encode() + b"\n", stdout=fh)
    tmp.replace(out)


# ---------------------------------------------------------------- layers + cache

def digest(*parts: str | bytes | Path) -> str:
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, Path):
            for f in sorted(p for p in part.rglob("*") if p.is_file()) if part.is_dir() else [part]:
                if "__pycache__" in f.parts or f.suffix == ".pyc":
                    continue
                h.update(str(f.relative_to(REPO)).encode() + b"\0" + f.read_bytes() + b"\0")
        else:
            h.update(part.encode() if isinstance(part, str) else part)
            h.update(b"\0")
    return h.hexdigest()


def cached(out: Path, key: str) -> bool:
    stamp = out.with_suffix(".key")
    return out.exists() and stamp.exists() and stamp.read_text().strip() == key


def build_base(kdir: Path, version: str, key: str) -> dict:
    out = BUILD / "base.cpio"
    with tempfile.TemporaryDirectory(dir=BUILD) as tmp:
        root = Path(tmp)
        install_busybox(root)
        shutil.copytree(kdir / "modules", root / "lib" / "modules")
        run(["/bin/busybox", "depmod", "-b", str(root), version])
        exe = copy_interpreter(root)
        stdlib = copy_stdlib(root)
        dists = copy_site_packages(root, host_paths()["purelib"])
        copy_shared_libs(root)
        strip_elves(root)
        compile_tree(root, root / Path(sys.base_prefix).relative_to("/"))
        drop_stdlib_sources(stdlib)
        (root / "etc" / "statefs-guest.env").write_text(
            f"PYTHON={exe}\nKERNEL_VERSION={version}\n")
        write_cpio(root, out)
    out.with_suffix(".key").write_text(key + "\n")
    return {"dists": dists}


def check_project_imports() -> None:
    """Fail the build, with file and line, if the project imports a pruned stdlib module:
    better than a ModuleNotFoundError deep inside a guest boot."""
    bad = []
    for pkg in PROJECT_PACKAGES:
        for py in sorted((REPO / pkg).rglob("*.py")):
            try:
                tree = ast.parse(py.read_bytes(), str(py))
            except SyntaxError:
                continue  # compileall reports it
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                bad += [f"{py.relative_to(REPO)}:{node.lineno} imports {n}" for n in names
                        if n.split(".")[0] in PRUNED_MODULES]
    if bad:
        raise SystemExit("build_guest: the guest's stdlib leaves out modules the project "
                         "imports (keep them in STDLIB_SKIP_*):\n  " + "\n  ".join(bad))


def build_app(key: str) -> None:
    check_project_imports()
    out = BUILD / "app.cpio"
    with tempfile.TemporaryDirectory(dir=BUILD) as tmp:
        root = Path(tmp)
        shutil.copy2(GUEST_SRC / "init", root / "init")
        (root / "init").chmod(0o755)
        (root / "guest").mkdir()
        shutil.copy2(GUEST_SRC / "guest_main.py", root / "guest" / "guest_main.py")
        app = root / "app"
        for pkg in PROJECT_PACKAGES:
            if (REPO / pkg).is_dir():
                shutil.copytree(REPO / pkg, app / pkg,
                                ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        app.mkdir(exist_ok=True)
        compile_tree(root, root / "guest")
        compile_tree(root, app)
        write_cpio(root, out)
    out.with_suffix(".key").write_text(key + "\n")


def build(force: bool = False) -> dict:
    """Build what is stale; return a description of the result (also stored in guest.json).

    Holds an exclusive lock on build/.lock: parallel test runs share one build.
    """
    BUILD.mkdir(parents=True, exist_ok=True)
    with open(BUILD / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _build(force)


def _build(force: bool) -> dict:
    t0 = time.monotonic()
    ensure_tools()
    pkg = kernel_package()
    kdir, version = fetch_kernel(pkg)

    dists = [f"{d.metadata['Name']}=={d.version}" for d in runtime_distributions()]
    base_key = digest(Path(__file__), pkg, sys.base_prefix, sys.version, *dists)
    app_key = digest(Path(__file__), GUEST_SRC,
                     *[REPO / p for p in PROJECT_PACKAGES if (REPO / p).is_dir()])
    rebuilt = []
    if force or not cached(BUILD / "base.cpio", base_key):
        log("building base.cpio (python, stdlib, dependencies, busybox, modules)")
        build_base(kdir, version, base_key)
        rebuilt.append("base")
    if force or not cached(BUILD / "app.cpio", app_key):
        build_app(app_key)
        rebuilt.append("app")

    initrd_key = digest(base_key, app_key)
    initrd = BUILD / "initrd.cpio"
    if rebuilt or not cached(initrd, initrd_key):
        tmp = initrd.with_suffix(".tmp")
        with tmp.open("wb") as fh:
            for part in ("base.cpio", "app.cpio"):
                with (BUILD / part).open("rb") as src:
                    shutil.copyfileobj(src, fh, 1 << 20)
        tmp.replace(initrd)
        initrd.with_suffix(".key").write_text(initrd_key + "\n")
        shutil.copy2(kdir / "vmlinux", BUILD / "vmlinux")
        rebuilt.append("initrd")

    info = {
        "kernel_package": pkg,
        "kernel_version": version,
        "vmlinux": str(BUILD / "vmlinux"),
        "initrd": str(initrd),
        "initrd_bytes": initrd.stat().st_size,
        "base_bytes": (BUILD / "base.cpio").stat().st_size,
        "app_bytes": (BUILD / "app.cpio").stat().st_size,
        "python": sys.base_prefix,
        "dists": dists,
        "key": initrd_key,
        "rebuilt": rebuilt,
        "seconds": round(time.monotonic() - t0, 2),
    }
    (BUILD / "guest.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--force", action="store_true", help="rebuild every layer")
    ap.add_argument("--json", action="store_true", help="print the build description as JSON")
    args = ap.parse_args(argv)
    info = build(force=args.force)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        what = ", ".join(info["rebuilt"]) or "nothing (cached)"
        log(f"rebuilt {what} in {info['seconds']} s; initrd {info['initrd_bytes'] / 1e6:.1f} MB, "
            f"kernel {info['kernel_version']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
