"""Runs the README's five-minute tour against a running `clm up`, exactly as
a user would type it, and fails when an example no longer works.

The tour is the README section whose heading starts with "A five-minute
tour". Its fenced blocks run in order:

- ```sh blocks: each command runs in bash, in a scratch directory where
  `proto` is this checkout's proto/ copied (so `-I proto` and `find proto` work as it does from the
  checkout); `grpcurl`, `pip` and `python` are the client test
  virtualenv's. A command must exit 0.
- ```python blocks run with that virtualenv's python in the same directory.
- ```json and ```text blocks show (part of) what the command or program
  just before them prints: every line of the block must appear, stripped,
  as a line of its output (a trailing comma aside), where `<id>` stands for any id. A command
  followed by such a block is repeated (up to 60 s) until its output shows
  it: the services follow each other's streams, so a score or a membership
  appears a moment after the touchpoint.

What is filled in, as the user would: `localhost:5005N` becomes the address
the tested `clm up` printed for that service (run.sh starts it on free
ports), and `customers/<id>` / `segments/<id>` become the newest name of
that kind the tour has printed so far. Nothing else is changed.

Also checks that every relative link of README.md and docs/*.md names a
file that exists, so a moved section stays one click away.

Usage: readme_tour.py ROOT VENV_BIN (addresses in CLM_*_ADDR, as run.sh sets).
"""

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

ROOT, VENV_BIN = sys.argv[1], sys.argv[2]
PORTS = {
    "50051": "CLM_CUSTOMER_ADDR",
    "50052": "CLM_SCORING_ADDR",
    "50053": "CLM_SEGMENTATION_ADDR",
    "50054": "CLM_FEEDBACK_ADDR",
    "50055": "CLM_LOYALTY_ADDR",
}
NAME = re.compile(r"\b(customers|segments)/([0-9a-fA-F-]{8,})")


def tour_blocks(readme):
    """The (language, text) of every fenced block of the tour section."""
    section = re.search(r"^## A five-minute tour.*?(?=^## )", readme, re.S | re.M)
    if not section:
        sys.exit("README.md has no '## A five-minute tour' section")
    return re.findall(r"^```(\w+)\n(.*?)^```$", section.group(0), re.S | re.M)


def commands(block):
    """Split a shell block into commands: a command ends at a line that has
    no trailing backslash and leaves no single quote open."""
    out, cur = [], ""
    for line in block.splitlines():
        if not cur and not line.strip():
            continue
        cur += line + "\n"
        if not line.endswith("\\") and cur.count("'") % 2 == 0:
            out.append(cur)
            cur = ""
    if cur.strip():
        out.append(cur)
    return out


class Tour:
    def __init__(self, workdir):
        self.workdir = workdir
        self.names = {}
        self.env = dict(os.environ, PATH=VENV_BIN + os.pathsep + os.environ["PATH"])

    def fill(self, text):
        for port, var in PORTS.items():
            text = text.replace(f"localhost:{port}", os.environ[var])
        for kind in ("customers", "segments"):
            if f"{kind}/<id>" in text:
                if kind not in self.names:
                    raise AssertionError(f"the tour uses {kind}/<id> before printing one")
                text = text.replace(f"{kind}/<id>", self.names[kind])
        return text

    def run(self, argv):
        out = subprocess.run(
            argv, cwd=self.workdir, env=self.env, capture_output=True, text=True, timeout=300
        )
        return out.returncode, out.stdout + out.stderr

    def step(self, lang, text, expected):
        filled = self.fill(text)
        argv = ["bash", "-euo", "pipefail", "-c", filled] if lang == "sh" else [
            os.path.join(VENV_BIN, "python"), "-c", filled]
        deadline = time.time() + 60
        while True:
            code, output = self.run(argv)
            missing = ["(exit status 0)"] if code else []
            if expected is not None:
                lines = {line.strip().rstrip(",") for line in output.splitlines()}
                missing += [e for e in expected if not any(e.fullmatch(line) for line in lines)]
            if not missing:
                break
            if expected is None or time.time() > deadline:
                raise AssertionError(
                    f"README tour step failed:\n{filled}\nexit status {code}; "
                    f"missing {[getattr(m, 'pattern', m) for m in missing]}; output:\n{output}"
                )
            time.sleep(0.5)
        for kind, ident in NAME.findall(output):
            self.names[kind] = f"{kind}/{ident}"
        print(f"ok: {filled.splitlines()[0][:100]}")


def expectation(block):
    pats = []
    for line in block.splitlines():
        line = line.strip().rstrip(",")
        if line:
            pats.append(re.compile(re.escape(line).replace(re.escape("<id>"), r"[A-Za-z0-9-]+")))
    return pats


def check_links():
    bad = []
    files = [os.path.join(ROOT, "README.md")] + [
        os.path.join(ROOT, "docs", f) for f in sorted(os.listdir(os.path.join(ROOT, "docs")))
        if f.endswith(".md")
    ]
    for path in files:
        text = open(path, encoding="utf-8").read()
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
            if re.match(r"[a-z]+:", target):
                continue
            if not os.path.exists(os.path.join(os.path.dirname(path), target)):
                bad.append(f"{os.path.relpath(path, ROOT)}: {target}")
    if bad:
        raise AssertionError("links to missing files:\n" + "\n".join(bad))


def main():
    check_links()
    blocks = tour_blocks(open(os.path.join(ROOT, "README.md"), encoding="utf-8").read())
    steps = []  # (lang, text, expected lines or None)
    for lang, text in blocks:
        if lang in ("json", "text"):
            if not steps:
                raise AssertionError("the tour shows output before any command")
            steps[-1] = (steps[-1][0], steps[-1][1], expectation(text))
        elif lang == "sh":
            steps += [("sh", c, None) for c in commands(text)]
        elif lang == "python":
            steps.append(("python", text, None))
        else:
            raise AssertionError(f"the tour has a ```{lang} block the check cannot run")
    with tempfile.TemporaryDirectory() as work:
        shutil.copytree(os.path.join(ROOT, "proto"), os.path.join(work, "proto"))
        tour = Tour(work)
        for lang, text, expected in steps:
            tour.step(lang, text, expected)
    print(f"README tour: {len(steps)} steps passed")


if __name__ == "__main__":
    main()
