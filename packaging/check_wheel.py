"""Check a built wheel: its tag, what it ships, and that its extension carries no C++ runtime
that another extension could meet (torch's and TensorFlow's libstdc++).

    python packaging/check_wheel.py WHEEL [--plat manylinux_2_28_x86_64]

Needs pyelftools (a dependency of auditwheel). Exits 1 with one line per problem.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import zipfile
from pathlib import Path

from elftools.elf.dynamic import DynamicSection
from elftools.elf.elffile import ELFFile
from elftools.elf.gnuversions import GNUVerNeedSection

# What the manylinux_2_28 policy allows of glibc (auditwheel's policy file caps GLIBC at 2.28).
MAX_GLIBC = (2, 28)
GLIBC_CXA = {"__cxa_atexit", "__cxa_finalize", "__cxa_thread_atexit_impl"}  # glibc's, not C++'s
# What C++'s personality routine and throw ask of the unwinder: all of it from libgcc_s, or the
# static libunwind's copy of part of it could meet libgcc_s's frames.
UNWINDER = {"_Unwind_DeleteException", "_Unwind_GetIP", "_Unwind_GetLanguageSpecificData",
            "_Unwind_GetRegionStart", "_Unwind_RaiseException", "_Unwind_Resume",
            "_Unwind_SetGR", "_Unwind_SetIP"}
SHIPPED = ("aiocuda/__init__.py", "aiocuda/_core.pyi", "aiocuda/py.typed", "aiocuda/torch.py",
           "aiocuda/tensorflow.py", "aiocuda/bench/__main__.py")


def check(wheel: Path, plat: str) -> list[str]:
    problems: list[str] = []
    if not wheel.name.endswith(f"-{plat}.whl") and f".{plat}" not in wheel.name and \
            f"-{plat}." not in wheel.name:
        problems.append(f"{wheel.name}: the tag is not {plat}")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        for want in SHIPPED:
            if want not in names:
                problems.append(f"{wheel.name}: {want} is missing")
        for name in names:
            if name.startswith(("tests/", "csrc/")) or "emu" in Path(name).name:
                problems.append(f"{wheel.name}: ships {name}, which is not part of the package")
            if name.endswith(".libs/") or ".libs/" in name:
                problems.append(f"{wheel.name}: grafts {name}: the extension should need no "
                                "library outside the system's glibc")
        cores = [n for n in names if re.fullmatch(r"aiocuda/_core\..*\.so", n)]
        if len(cores) != 1:
            return problems + [f"{wheel.name}: expected one aiocuda/_core.*.so, found {cores}"]
        with tempfile.TemporaryDirectory() as tmp:
            so = Path(z.extract(cores[0], tmp))
            problems += check_extension(so, wheel.name)
    return problems


def check_extension(so: Path, label: str) -> list[str]:
    problems: list[str] = []
    with so.open("rb") as f:
        elf = ELFFile(f)
        needed: list[str] = []
        for sec in elf.iter_sections():
            if isinstance(sec, DynamicSection):
                needed += [t.needed for t in sec.iter_tags() if t.entry.d_tag == "DT_NEEDED"]
        for lib in needed:
            if lib.startswith(("libstdc++", "libc++", "libcuda", "libcudart",
                               "libtorch", "libc10", "libtensorflow")):
                problems.append(f"{label}: _core needs {lib}")
        if "libgcc_s.so.1" not in needed:
            # glibc's pthread_exit() unwinds with libgcc_s: a private unwinder asked about its
            # frames crashes the process (CPython ends threads that way at exit).
            problems.append(f"{label}: _core does not take its unwinder from libgcc_s.so.1")
        versions: set[str] = set()
        for sec in elf.iter_sections():
            if isinstance(sec, GNUVerNeedSection):
                for _, auxes in sec.iter_versions():
                    versions |= {aux.name for aux in auxes}
        for v in sorted(versions):
            m = re.fullmatch(r"GLIBC_(\d+)\.(\d+)(?:\.\d+)?", v)
            if v.startswith(("GLIBCXX_", "CXXABI_")):
                problems.append(f"{label}: _core uses the C++ runtime's symbol version {v}")
            elif m and (int(m[1]), int(m[2])) > MAX_GLIBC:
                problems.append(f"{label}: _core needs {v}, newer than glibc "
                                f"{MAX_GLIBC[0]}.{MAX_GLIBC[1]}")
        dynsym = elf.get_section_by_name(".dynsym")
        exported: list[str] = []
        imported_cxx: list[str] = []
        imported_unwind: set[str] = set()
        for sym in dynsym.iter_symbols() if dynsym is not None else ():
            if not sym.name:
                continue
            if sym["st_shndx"] == "SHN_UNDEF":
                if sym.name.startswith(("_Z", "__cxa_", "__gxx_")) and sym.name not in GLIBC_CXA:
                    imported_cxx.append(sym.name)
                elif sym.name.startswith("_Unwind_"):
                    imported_unwind.add(sym.name)
            elif sym["st_info"]["bind"] in ("STB_GLOBAL", "STB_WEAK"):
                exported.append(sym.name)
        if exported != ["PyInit__core"]:
            problems.append(f"{label}: _core exports {sorted(exported)[:8]}"
                            f"{' ...' if len(exported) > 8 else ''}; only PyInit__core may be "
                            "exported, or its C++ runtime could bind to another module's")
        if imported_cxx:
            problems.append(f"{label}: _core imports C++ runtime symbols {imported_cxx[:5]}")
        if UNWINDER - imported_unwind:
            problems.append(f"{label}: _core carries (part of) an unwinder of its own, not "
                            f"libgcc_s's: {sorted(UNWINDER - imported_unwind)} are not imported")
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("wheels", nargs="+", type=Path)
    parser.add_argument("--plat", default="manylinux_2_28_x86_64")
    args = parser.parse_args()
    problems = [p for w in args.wheels for p in check(w, args.plat)]
    for p in problems:
        print(f"check_wheel: {p}", file=sys.stderr)
    if not problems:
        print(f"check_wheel: {len(args.wheels)} wheel(s) OK: {args.plat}, only PyInit__core "
              "exported, no libstdc++, libgcc_s's unwinder, glibc <= 2.28")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
