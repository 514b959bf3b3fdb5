#!/usr/bin/env python3
"""Prints a nextest filterset selecting the test binaries that depend on
the storage backend: `binary_id(PKG::NAME)` for an integration test,
`binary_id(PKG)` for a crate's unit tests, joined by ` | `.

scripts/test.sh runs these again on PostgreSQL + Redis
(`cargo nextest run -E "$(scripts/backend-tests.py)"`, the same build as
the SQLite pass); every other test touches no database or cache and runs
once, in the SQLite pass. `--list` prints one binary id per line instead.

The convention: a target depends on the backend when its source uses
`TestBackend` (clm_platform::testing) or reads `CLM_TEST_DATABASE_URL` or
`CLM_TEST_REDIS_URL`. An integration test is judged by its own file, the
files under a directory of the same name, and the modules it declares
(`mod common;` -> tests/common.rs or tests/common/); a crate's unit tests by
every file of the crate's src/ except the harness itself (testing.rs).
Targets with `required-features` (the benchmarks, `bench`) are not built
by the test run and are left out.
"""
import json
import os
import re
import subprocess
import sys

MARK = re.compile(r"TestBackend|CLM_TEST_DATABASE_URL|CLM_TEST_REDIS_URL")
MOD = re.compile(r"^\s*(?:pub\s+)?mod\s+([a-z_][a-z0-9_]*)\s*;", re.M)


def declared_modules(src):
    """Files of the modules `src` declares next to itself (`mod common;`)."""
    try:
        with open(src, encoding="utf-8") as f:
            names = MOD.findall(f.read())
    except OSError:
        return []
    base = os.path.dirname(src)
    files = []
    for name in names:
        files.append(os.path.join(base, name + ".rs"))
        files.extend(rust_files(os.path.join(base, name)))
    return files


def mentions(paths):
    for path in paths:
        try:
            with open(path, encoding="utf-8") as f:
                if MARK.search(f.read()):
                    return True
        except OSError:
            pass
    return False


def rust_files(directory, skip=()):
    for root, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(root, name)
            if name.endswith(".rs") and os.path.basename(path) not in skip:
                yield path


def main():
    meta = json.loads(
        subprocess.check_output(
            ["cargo", "metadata", "--no-deps", "--format-version", "1"]
        )
    )
    out = []
    for pkg in meta["packages"]:
        for target in pkg["targets"]:
            kinds = target["kind"]
            src = target["src_path"]
            if target.get("required-features"):
                continue
            if "test" in kinds:
                files = [
                    src,
                    *rust_files(os.path.splitext(src)[0]),
                    *declared_modules(src),
                ]
                if mentions(files):
                    out.append(f"{pkg['name']}::{target['name']}")
            elif "lib" in kinds:
                files = rust_files(os.path.dirname(src), skip=("testing.rs",))
                if mentions(files):
                    out.append(pkg["name"])
    out.sort()
    if "--list" in sys.argv[1:]:
        print("\n".join(out))
    else:
        print(" | ".join(f"binary_id({b})" for b in out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
