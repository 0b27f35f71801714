#!/usr/bin/env python3
"""Runs the fenced code blocks of the docs as written (stdlib only).

Usage (normally through scripts/test-snippets.sh, which builds what the docs
tell a user to build first and prepares the virtual environment):

    scripts/snippets.py [--venv DIR] [--keep] [--verbose] [--list] [SEL ...]

SEL is a markdown file (every block of it) or FILE:LINE (the block whose
fence, marker or body is on that line, with the blocks of its group that come
before it); without SEL the four files of DOC_FILES are run.

How a block runs is declared by an HTML comment on the line right before its
opening fence; a block without one runs with the defaults of its language:

    <!-- snippet: KEY=VALUE FLAG KEY="VALUE WITH SPACES" ... -->

    skip reason="..."   not run (the reason is required and printed)
    timeout=SECS        limit for the block (default 60; a Rust block's build
                        has its own limit, build_timeout=SECS, default 600)
    group=NAME          blocks of one file with the same group share a
                        temporary directory, a broker and the processes that
                        `background` blocks leave running; they run in file
                        order, or by order=N
    order=N             position in its group
    broker=CONFIG       start `tensorbus broker --config CONFIG` (relative to
                        the repository; `broker=default`: no --config, the
                        built-in defaults) on the group's socket before the
                        block (once per group)
    background          start the block and go on; killed when its group ends
                        (a failure before then fails it)
    ready=socket        (background) wait until the group's socket accepts
                        connections before the next block
    socket=PATH         the block names this socket path literally: it is
                        replaced by the group's socket, so that a run never
                        touches a broker of the user's
    replace="OLD=>NEW"  the block is run with OLD replaced by NEW (an install
                        prefix by one in the group's directory, $SNIPPET_TMP);
                        may be repeated. For what must not be touched, never
                        to make a block pass
    env="K=V"           an environment variable for the block ($SNIPPET_TMP
                        is the group's directory); may be repeated
    cwd=repo|tmp        where the block runs (shell: repo; others: tmp); a
                        shell block's tmp has the repository's top-level
                        entries linked into it, so that the text's relative
                        paths resolve while what it writes stays there
    lang=LANG           run the block as LANG
    expect="TEXT"       the block's output must contain TEXT (may be repeated)
    file=NAME           also save the block as NAME in the group's directory
                        (a C program that a later shell block compiles)
    cargo-deps          (toml) a Cargo.toml [dependencies] fragment: parsed,
                        checked, and used by the group's Rust blocks (relative
                        paths resolved against the repository, where the text
                        has the user's manifest)
    config              (toml) a broker config: a broker is started with it
                        and stopped with SIGTERM (exit status 0 expected)

Defaults: sh, bash, shell: `bash -euo pipefail` in the repository root;
console: the `$ ` lines of it, likewise; python: the venv's python; c:
compiled with `cc -std=c11 -Wall -Wextra` and the build tree's tensorbus.pc
(bindings/c/README.md), then run; rust: a temporary Cargo project depending
on crates/tensorbus by path (a body is wrapped in a main returning Result,
as rustdoc does), built and run; toml: `config` if it has [[pools]],
[[channels]], [broker] or [limits], `cargo-deps` if it has [dependencies];
text: not code, listed only. Anything else without a marker fails.

Every block gets TENSORBUS_SOCKET under a fresh temporary directory, PATH with
the venv's bin/ and `tensorbus` (target/release/tensorbus), CARGO_INSTALL_ROOT
in the run's directory (a `cargo install` lands there, on PATH), and its own
process group; everything still running at the end of a block (foreground)
or of its group (background) is killed, group by group, at exit too.
"""

from __future__ import annotations

import argparse
import atexit
import os
import re
import shlex
import shutil
import signal
import socket as socketmod
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC_FILES = ["README.md", "bindings/python/README.md", "bindings/c/README.md", "examples/README.md"]
DEFAULT_TIMEOUT = 60.0
DEFAULT_BUILD_TIMEOUT = 600.0
SHELL_LANGS = {"sh", "bash", "shell", "console"}
TEXT_LANGS = {"text", "txt", "plain", "plaintext"}
KNOWN_KEYS = {
    "skip", "reason", "timeout", "build_timeout", "group", "order", "broker", "background",
    "ready", "socket", "env", "cwd", "lang", "expect", "file", "cargo-deps", "config", "replace",
}
REPEATABLE = {"env", "expect", "replace"}
FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,}|~{3,})\s*(?P<info>[^`]*)$")
MARKER = re.compile(r"^\s*<!--\s*snippet:(?P<body>.*?)-->\s*$")
TMP_SOCKET = re.compile(r"(/tmp/[\w.+-]+(?:/[\w.+-]+)*\.sock)\b")


class MarkerError(Exception):
    """A marker that cannot be parsed or names an unknown key."""


@dataclass
class Block:
    """One fenced code block of a markdown file."""

    file: str
    line: int  # 1-based line of the opening fence
    end: int  # 1-based line of the closing fence
    lang: str
    attrs: list[str]
    code: str
    marker: dict[str, list[str]] | None
    marker_line: int | None
    marker_error: str | None = None

    def opt(self, key: str, default: str | None = None) -> str | None:
        if self.marker and key in self.marker:
            return self.marker[key][-1]
        return default

    def opts(self, key: str) -> list[str]:
        return list(self.marker.get(key, [])) if self.marker else []

    def flag(self, key: str) -> bool:
        return bool(self.marker) and key in self.marker

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"


@dataclass
class Result:
    """What running one block gave."""

    block: Block
    status: str  # pass, FAIL, TIMEOUT, skip, text, started
    seconds: float = 0.0
    note: str = ""
    output: str = ""


def parse_marker(body: str) -> dict[str, list[str]]:
    try:
        tokens = shlex.split(body)
    except ValueError as e:
        raise MarkerError(f"cannot parse marker: {e}") from None
    out: dict[str, list[str]] = {}
    for tok in tokens:
        key, sep, value = tok.partition("=")
        if key not in KNOWN_KEYS:
            raise MarkerError(f"unknown marker key {key!r} (known: {', '.join(sorted(KNOWN_KEYS))})")
        if key in out and key not in REPEATABLE:
            raise MarkerError(f"marker key {key!r} given twice")
        out.setdefault(key, []).append(value if sep else "")
    return out


def extract(path: str) -> list[Block]:
    """Every fenced code block of a markdown file, with the marker before it."""
    lines = (ROOT / path).read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, indent = m.group("fence"), len(m.group("indent"))
        info = m.group("info").strip()
        start = i
        body: list[str] = []
        i += 1
        while i < len(lines):
            close = re.match(r"^\s*(`{3,}|~{3,})\s*$", lines[i])
            if close and close.group(1)[0] == fence[0] and len(close.group(1)) >= len(fence):
                break
            line = lines[i]
            # Strip the fence's own indentation (a block inside a list item).
            strip = min(indent, len(line) - len(line.lstrip(" ")))
            body.append(line[strip:])
            i += 1
        end = i
        i += 1
        parts = [p.strip() for p in re.split(r"[,\s]+", info) if p.strip()]
        lang = parts[0].lower() if parts else ""
        marker = None
        marker_line = None
        marker_error = None
        if start > 0:
            mm = MARKER.match(lines[start - 1])
            if mm:
                marker_line = start
                try:
                    marker = parse_marker(mm.group("body"))
                except MarkerError as e:
                    marker_error = str(e)
                    marker = {}
        blocks.append(
            Block(path, start + 1, end + 1, lang, parts[1:], "\n".join(body) + "\n", marker, marker_line, marker_error)
        )
    return blocks


# --- processes -------------------------------------------------------------

LIVE: dict[int, subprocess.Popen[bytes]] = {}  # process group id -> its leader, killed at exit


def kill_group(pgid: int, grace: float = 3.0) -> None:
    """SIGTERM to a process group, then SIGKILL to whatever is left after `grace`."""
    leader = LIVE.get(pgid)
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        LIVE.pop(pgid, None)
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if leader is not None:
            leader.poll()  # reap it: a zombie leader keeps the group alive
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.02)
    else:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if leader is not None:
        try:
            leader.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
    LIVE.pop(pgid, None)


def kill_all() -> None:
    for pgid in list(LIVE):
        kill_group(pgid, grace=1.0)


def spawn(argv: list[str], env: dict[str, str], cwd: Path, log: Path, what: str) -> subprocess.Popen[bytes]:
    """Starts argv in a session of its own (its own process group), output to `log`."""
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    LIVE[proc.pid] = proc
    return proc


def wait(proc: subprocess.Popen[bytes], timeout: float) -> int | None:
    """The exit status, or None after `timeout` seconds (the process is left running)."""
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        return None


def socket_ready(path: str) -> bool:
    if not os.path.exists(path):
        return False
    s = socketmod.socket(socketmod.AF_UNIX, socketmod.SOCK_SEQPACKET)
    try:
        s.settimeout(1.0)
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()


def wait_socket(path: str, proc: subprocess.Popen[bytes], timeout: float) -> str | None:
    """None once `path` accepts connections; else why not."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if socket_ready(path):
            return None
        rc = proc.poll()
        if rc is not None:
            return f"exited with status {rc} before {path} accepted connections"
        time.sleep(0.05)
    return f"{path} did not accept connections within {timeout:.0f} s"


def tail(path: Path, lines: int = 60) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return ""
    rows = text.splitlines()
    cut = rows[-lines:]
    head = f"[... {len(rows) - lines} lines before]\n" if len(rows) > lines else ""
    return head + "\n".join(cut)


# --- groups and blocks -----------------------------------------------------


@dataclass
class Group:
    """Blocks that share a directory, a socket, a broker and background processes."""

    name: str
    file: str
    blocks: list[Block]
    tmp: Path = Path()
    sock: str = ""
    env: dict[str, str] = field(default_factory=dict)
    broker: subprocess.Popen[bytes] | None = None
    background: list[tuple[Block, subprocess.Popen[bytes], Path, float]] = field(default_factory=list)
    cargo_deps: str | None = None


class Runner:
    def __init__(self, venv: Path, keep: bool, verbose: bool) -> None:
        self.venv = venv.absolute()
        self.keep = keep
        self.verbose = verbose
        self.base = Path(tempfile.mkdtemp(prefix="tbsnip-"))
        self.bindir = self.base / "bin"
        self.bindir.mkdir()
        cli = ROOT / "target" / "release" / "tensorbus"
        (self.bindir / "tensorbus").symlink_to(cli)
        self.cli = cli
        self.results: list[Result] = []
        self.counter = 0

    def cleanup(self) -> None:
        kill_all()
        if not self.keep:
            shutil.rmtree(self.base, ignore_errors=True)
        else:
            print(f"snippets: kept {self.base}")

    # -- environment

    def group_env(self, g: Group) -> dict[str, str]:
        env = dict(os.environ)
        # The docs name target/ (the default target directory): no override.
        env.pop("CARGO_TARGET_DIR", None)
        env["TENSORBUS_SOCKET"] = g.sock
        env["SNIPPET_TMP"] = str(g.tmp)
        env["VIRTUAL_ENV"] = str(self.venv)
        # A `cargo install` of a block goes to a directory of this run, on PATH, not ~/.cargo/bin.
        env["CARGO_INSTALL_ROOT"] = str(self.base / "cargo-install")
        path = [self.venv / "bin", self.base / "cargo-install" / "bin", self.bindir]
        env["PATH"] = ":".join(map(str, path)) + ":" + env.get("PATH", "/usr/bin:/bin")
        env["PYTHONUNBUFFERED"] = "1"
        env.pop("PYTHONHOME", None)
        return env

    def block_env(self, g: Group, b: Block) -> dict[str, str]:
        env = dict(g.env)
        for kv in b.opts("env"):
            k, sep, v = kv.partition("=")
            if not sep:
                raise MarkerError(f"env={kv!r}: expected K=V")
            env[k] = os.path.expandvars(v.replace("$SNIPPET_TMP", str(g.tmp)))
        return env

    # -- one group

    def run_group(self, g: Group) -> None:
        g.tmp = Path(tempfile.mkdtemp(prefix="g", dir=self.base))
        g.sock = str(g.tmp / "tb.sock")
        g.env = self.group_env(g)
        try:
            for b in g.blocks:
                print(f"snippets: {b.where} ({b.opt('lang') or b.lang or '-'}) ...", flush=True)
                r = self.run_block(g, b)
                self.results.append(r)
                print(f"  {r.status} {r.seconds:.1f}s {r.note.splitlines()[0] if r.note else ''}", flush=True)
                if self.verbose and r.output and r.status not in ("FAIL", "TIMEOUT"):
                    print(r.output)
        finally:
            self.end_group(g)

    def end_group(self, g: Group) -> None:
        for b, proc, log, t0 in g.background:
            rc = proc.poll()
            res = next(r for r in self.results if r.block is b)
            if rc is not None and rc != 0:
                res.status = "FAIL"
                res.note = f"background block: {exit_note(rc)}"
                res.output = tail(log)
            elif rc is None:
                res.note = (res.note + "; " if res.note else "") + "still running at the group's end: stopped"
            res.seconds = time.monotonic() - t0
            kill_group(proc.pid)
        if g.broker is not None:
            kill_group(g.broker.pid)

    def start_broker(self, g: Group, b: Block, config: str) -> str | None:
        if g.broker is not None:
            return None
        argv = [str(self.cli), "broker", "--socket", g.sock]
        if config != "default":
            path = ROOT / config
            if not path.is_file():
                return f"broker={config}: no such file"
            argv += ["--config", str(path)]
        log = g.tmp / "broker.log"
        g.broker = spawn(argv, g.env, ROOT, log, f"broker for {b.where}")
        why = wait_socket(g.sock, g.broker, 10.0)
        if why:
            return f"broker {config}: {why}\n{tail(log)}"
        return None

    def run_block(self, g: Group, b: Block) -> Result:
        self.counter += 1
        n = self.counter
        t0 = time.monotonic()
        if b.marker_error:
            return Result(b, "FAIL", note=f"marker on line {b.marker_line}: {b.marker_error}")
        if b.flag("skip"):
            reason = b.opt("reason")
            if not reason:
                return Result(b, "FAIL", note="skip without reason=\"...\"")
            return Result(b, "skip", note=reason)
        if b.opt("reason") is not None:
            return Result(b, "FAIL", note="reason= without skip")
        lang = b.opt("lang") or b.lang
        if lang in TEXT_LANGS:
            return Result(b, "text", note="not code")
        code = b.code
        # Literal socket paths: declared ones become the group's socket; others are refused.
        declared = b.opts("socket")
        for path in declared:
            code = code.replace(path, g.sock)
        for rule in b.opts("replace"):
            old, sep, new = rule.partition("=>")
            if not sep or not old:
                return Result(b, "FAIL", note=f"replace={rule!r}: expected OLD=>NEW")
            code = code.replace(old, new.replace("$SNIPPET_TMP", str(g.tmp)))
        stray = sorted(set(TMP_SOCKET.findall(code)) - {g.sock})
        if stray:
            return Result(b, "FAIL", note=f"names socket {', '.join(stray)}: declare socket=PATH in its marker")
        if b.opt("file"):
            (g.tmp / b.opt("file")).write_text(code)  # type: ignore[operator]
        try:
            env = self.block_env(g, b)
            timeout = float(b.opt("timeout", str(DEFAULT_TIMEOUT)))  # type: ignore[arg-type]
        except (MarkerError, ValueError) as e:
            return Result(b, "FAIL", note=str(e))
        broker = b.opt("broker")
        if broker:
            why = self.start_broker(g, b, broker)
            if why:
                return Result(b, "FAIL", time.monotonic() - t0, note=why.splitlines()[0], output=why)
        log = g.tmp / f"block{n}.log"
        try:
            argv, cwd, prep = self.prepare(g, b, lang, code, n, env)
        except MarkerError as e:
            return Result(b, "FAIL", note=str(e))
        if prep is not None:  # a build step (Rust), with its own limit
            ok, note = self.build(prep, env, g, b, log)
            if not ok:
                return Result(b, "FAIL" if note != "TIMEOUT" else "TIMEOUT", time.monotonic() - t0,
                              note="build failed" if note != "TIMEOUT" else "build timed out", output=tail(log))
        if argv is None:  # checked without running anything more (toml)
            return self.check_toml(g, b, code, lang, env, log, t0)
        with open(log, "ab") as f:
            f.write(f"$ {shlex.join(argv)}   # in {cwd}\n".encode())
        proc = spawn(argv, env, cwd, log, b.where)
        if b.flag("background"):
            res = Result(b, "started", note="background")
            if b.opt("ready") == "socket":
                why = wait_socket(g.sock, proc, timeout)
                if why:
                    kill_group(proc.pid)
                    return Result(b, "FAIL", time.monotonic() - t0, note=f"background: {why}", output=tail(log))
            elif b.opt("ready"):
                return Result(b, "FAIL", note=f"ready={b.opt('ready')}: only ready=socket is known")
            g.background.append((b, proc, log, t0))
            return res
        rc = wait(proc, timeout)
        kill_group(proc.pid)  # whatever the block left running (`cmd &`)
        secs = time.monotonic() - t0
        out = tail(log)
        if rc is None:
            return Result(b, "TIMEOUT", secs, note=f"no exit within {timeout:.0f} s" + self.after_failure(g), output=out)
        if rc != 0:
            return Result(b, "FAIL", secs, note=exit_note(rc) + self.after_failure(g), output=out)
        text = log.read_text(errors="replace")
        missing = [e for e in b.opts("expect") if e not in text]
        if missing:
            return Result(b, "FAIL", secs, note=f"output lacks {missing[0]!r}", output=out)
        return Result(b, "pass", secs, output=out if self.verbose else "")

    # -- per language

    def prepare(self, g: Group, b: Block, lang: str, code: str, n: int, env: dict[str, str]):
        """(argv or None, cwd, build argv or None) for the block."""
        cwd_opt = b.opt("cwd")
        if cwd_opt not in (None, "repo", "tmp"):
            raise MarkerError(f"cwd={cwd_opt}: expected repo or tmp")
        if lang in SHELL_LANGS:
            if lang == "console":
                code = "\n".join(line[2:] for line in code.splitlines() if line.startswith("$ ")) + "\n"
            script = g.tmp / f"block{n}.sh"
            script.write_text(code)
            cwd = self.shadow(g) if cwd_opt == "tmp" else ROOT
            return ["bash", "-euo", "pipefail", str(script)], cwd, None
        if lang in ("python", "py", "python3"):
            script = g.tmp / f"block{n}.py"
            script.write_text(code)
            cwd = ROOT if cwd_opt == "repo" else g.tmp
            return [str(self.venv / "bin" / "python"), str(script)], cwd, None
        if lang == "c":
            src = g.tmp / f"block{n}.c"
            src.write_text(code)
            exe = g.tmp / f"block{n}"
            pc = ROOT / "target" / "tensorbus-c" / "pkgconfig"
            # bindings/c/README.md: compile against the build tree through its tensorbus.pc.
            build = (
                f"cc -std=c11 -Wall -Wextra -o {shlex.quote(str(exe))} {shlex.quote(str(src))} "
                f"$(PKG_CONFIG_PATH={shlex.quote(str(pc))} pkg-config --cflags --libs tensorbus)"
            )
            cwd = ROOT if cwd_opt == "repo" else g.tmp
            return [str(exe)], cwd, ["bash", "-euo", "pipefail", "-c", build]
        if lang == "rust":
            project = self.rust_project(g, b, code)
            exe = ROOT / "target" / "snippets-rust" / "target" / "debug" / "snippet"
            cwd = ROOT if cwd_opt == "repo" else g.tmp
            build = ["cargo", "build", "--quiet", "--manifest-path", str(project / "Cargo.toml")]
            env["CARGO_TARGET_DIR"] = str(ROOT / "target" / "snippets-rust" / "target")
            return [str(exe)], cwd, build
        if lang == "toml":
            return None, ROOT, None
        if b.marker is None:
            raise MarkerError(f"no marker, and a {lang or 'plain'!r} block has no default way to run")
        raise MarkerError(f"cannot run a {lang or 'plain'!r} block (lang=... in its marker?)")

    def after_failure(self, g: Group) -> str:
        """A hint when an earlier block of the same group failed (this one may only follow from it)."""
        for r in self.results:
            if r.block in g.blocks and r.status in ("FAIL", "TIMEOUT"):
                return f" (after {r.block.where} of its group failed)"
        return ""

    def shadow(self, g: Group) -> Path:
        """The group's directory with the repository's top-level entries linked into it.

        Relative paths of the text (target/..., examples/...) resolve there, and what the
        block writes (a.out, out.mp4) stays in the temporary directory.
        """
        for entry in ROOT.iterdir():
            link = g.tmp / entry.name
            if entry.name != ".git" and not link.exists() and not link.is_symlink():
                link.symlink_to(entry)
        return g.tmp

    def build(self, argv: list[str], env: dict[str, str], g: Group, b: Block, log: Path) -> tuple[bool, str]:
        limit = float(b.opt("build_timeout", str(DEFAULT_BUILD_TIMEOUT)))  # type: ignore[arg-type]
        with open(log, "ab") as f:
            f.write(f"$ {shlex.join(argv)}\n".encode())
        proc = spawn(argv, env, ROOT, log, f"build of {b.where}")
        rc = wait(proc, limit)
        kill_group(proc.pid)
        if rc is None:
            return False, "TIMEOUT"
        return rc == 0, ""

    def rust_project(self, g: Group, b: Block, code: str) -> Path:
        """A Cargo project for a Rust block (one directory, rebuilt per block, so dependencies stay built)."""
        project = ROOT / "target" / "snippets-rust" / "project"
        (project / "src").mkdir(parents=True, exist_ok=True)
        deps = g.cargo_deps
        if deps is None:
            deps = '[dependencies]\ntensorbus = { path = "crates/tensorbus" }\n'
        # Relative paths are the repository's (the text has the user's manifest at its root).
        deps = re.sub(
            r'(path\s*=\s*")([^"/][^"]*)"',
            lambda m: f'{m.group(1)}{(ROOT / m.group(2)).as_posix()}"',
            deps,
        )
        manifest = (
            '[package]\nname = "snippet"\nversion = "0.0.0"\nedition = "2021"\npublish = false\n\n'
            "[workspace]\n\n" + deps
        )
        (project / "Cargo.toml").write_text(manifest)
        lock = ROOT / "Cargo.lock"
        if lock.exists():
            shutil.copy(lock, project / "Cargo.lock")  # the repository's versions, no new resolution
        (project / "src" / "main.rs").write_text(rust_main(code, b))
        return project

    def check_toml(self, g: Group, b: Block, code: str, lang: str, env: dict[str, str], log: Path, t0: float) -> Result:
        kind = "cargo-deps" if b.flag("cargo-deps") else "config" if b.flag("config") else None
        if kind is None:
            if re.search(r"^\s*\[(\[pools\]|\[channels\]|broker\]|limits\])", code, re.M):
                kind = "config"
            elif re.search(r"^\s*\[(dev-|build-)?dependencies\]", code, re.M):
                kind = "cargo-deps"
            else:
                return Result(b, "FAIL", note="toml block without a marker: say cargo-deps or config")
        try:
            import tomllib
        except ImportError:  # Python < 3.11: the broker or cargo parse it below
            tomllib = None  # type: ignore[assignment]
        if tomllib is not None:
            try:
                tomllib.loads(code)
            except tomllib.TOMLDecodeError as e:
                return Result(b, "FAIL", note=f"not valid TOML: {e}")
        if kind == "cargo-deps":
            for rel in re.findall(r'path\s*=\s*"([^"]+)"', code):
                if not (ROOT / rel / "Cargo.toml").is_file():
                    return Result(b, "FAIL", note=f"path {rel!r}: no Cargo.toml there (from the repository root)")
            g.cargo_deps = code
            return Result(b, "pass", time.monotonic() - t0, note="cargo-deps for the group's Rust blocks")
        cfg = g.tmp / f"config{self.counter}.toml"
        cfg.write_text(code)
        sock = str(g.tmp / f"check{self.counter}.sock")
        proc = spawn([str(self.cli), "broker", "--config", str(cfg), "--socket", sock], env, g.tmp, log, b.where)
        why = wait_socket(sock, proc, 10.0)
        if why:
            kill_group(proc.pid)
            return Result(b, "FAIL", time.monotonic() - t0, note=f"broker with this config: {why}", output=tail(log))
        os.kill(proc.pid, signal.SIGTERM)
        rc = wait(proc, 10.0)
        kill_group(proc.pid)
        if rc != 0:
            note = "no exit within 10 s of SIGTERM" if rc is None else exit_note(rc)
            return Result(b, "FAIL", time.monotonic() - t0, note=f"broker at SIGTERM: {note}", output=tail(log))
        return Result(b, "pass", time.monotonic() - t0, note="broker started with it")


def exit_note(rc: int) -> str:
    if rc < 0:
        try:
            return f"killed by {signal.Signals(-rc).name}"
        except ValueError:
            return f"killed by signal {-rc}"
    return f"exit status {rc}"


def rust_main(code: str, b: Block) -> str:
    """The block as a program: rustdoc's hidden lines shown, a body wrapped in a main."""
    lines = []
    for line in code.splitlines():
        s = line.lstrip()
        if s.startswith("# ") or s == "#":
            line = line[: len(line) - len(s)] + s[2:]
        elif s.startswith("##"):
            line = line[: len(line) - len(s)] + s[1:]
        lines.append(line)
    body = "\n".join(lines)
    if re.search(r"\bfn\s+main\s*\(", body):
        return body + "\n"
    inner = [ln for ln in lines if not ln.lstrip().startswith("#![")]
    attrs = [ln for ln in lines if ln.lstrip().startswith("#![")]
    text = "\n".join(inner).rstrip()
    if not text.endswith("(())"):
        text += "\nOk(())"
    return (
        "\n".join(attrs)
        + "\n#[allow(unused)]\nfn _snippet() -> Result<(), Box<dyn std::error::Error>> {\n"
        + f"// {b.where}\n"
        + text
        + "\n}\n\nfn main() {\n    if let Err(e) = _snippet() {\n"
        + '        eprintln!("error: {e}");\n        std::process::exit(1);\n    }\n}\n'
    )


# --- selection and report --------------------------------------------------


def groups_of(blocks: list[Block]) -> list[Group]:
    """Blocks grouped (per file) in run order; an ungrouped block is a group of its own."""
    out: list[Group] = []
    named: dict[tuple[str, str], Group] = {}
    for b in blocks:
        name = b.opt("group")
        if name:
            key = (b.file, name)
            if key not in named:
                named[key] = Group(name, b.file, [])
                out.append(named[key])
            named[key].blocks.append(b)
        else:
            out.append(Group("", b.file, [b]))

    def order(b: Block) -> tuple[float, int]:
        try:
            return (float(b.opt("order", "inf")), b.line)  # type: ignore[arg-type]
        except ValueError:
            return (float("inf"), b.line)

    for g in out:
        g.blocks.sort(key=order)
    return out


def select(sels: list[str]) -> list[Group]:
    files = []
    wanted: dict[str, set[int] | None] = {}
    for sel in sels or DOC_FILES:
        path, _, line = sel.partition(":")
        if os.path.exists(path):
            full = Path(path).resolve()
            path = str(full.relative_to(ROOT)) if full.is_relative_to(ROOT) else str(full)
        if not (ROOT / path).is_file():
            sys.exit(f"snippets: no such file: {path}")
        if path not in wanted:
            files.append(path)
            wanted[path] = set()
        if line:
            if not line.isdigit():
                sys.exit(f"snippets: {sel}: expected FILE:LINE")
            if wanted[path] is not None:
                wanted[path].add(int(line))  # type: ignore[union-attr]
        else:
            wanted[path] = None
    groups: list[Group] = []
    for path in files:
        blocks = extract(path)
        lines = wanted[path]
        for g in groups_of(blocks):
            if lines is None:
                groups.append(g)
                continue
            hits = [i for i, b in enumerate(g.blocks) if any((b.marker_line or b.line) <= ln <= b.end for ln in lines)]
            if hits:
                g.blocks = g.blocks[: max(hits) + 1]  # with the blocks of its group before it
                groups.append(g)
        if lines:
            found = {ln for ln in lines if any((b.marker_line or b.line) <= ln <= b.end for b in blocks)}
            for ln in sorted(lines - found):
                sys.exit(f"snippets: {path}:{ln} is in no code block")
    return groups


def report(results: list[Result]) -> int:
    bad = [r for r in results if r.status in ("FAIL", "TIMEOUT")]
    for r in bad:
        print(f"\n--- {r.block.where} ({r.block.lang}) {r.status}: {r.note}")
        if r.output:
            print(r.output)
    w = max([len(r.block.where) for r in results] + [10])
    print(f"\n{'block':<{w}}  {'lang':<7} {'result':<8} {'s':>6}  note")
    for r in results:
        note = r.note.splitlines()[0] if r.note else ""
        print(f"{r.block.where:<{w}}  {r.block.lang or '-':<7} {r.status:<8} {r.seconds:6.1f}  {note}")
    counts: dict[str, int] = {}
    for r in results:
        counts[r.status] = counts.get(r.status, 0) + 1
    passed = counts.get("pass", 0) + counts.get("started", 0)
    failed = counts.get("FAIL", 0) + counts.get("TIMEOUT", 0)
    extra = ", ".join(f"{v} {k}" for k, v in sorted(counts.items()) if k in ("skip", "text"))
    print(f"\nsnippets: {passed} passed, {failed} failed" + (f" ({extra})" if extra else ""))
    return 1 if bad else 0


SELF_TEST = r"""
<!-- snippet: lang=sh -->
```bash
echo "$TENSORBUS_SOCKET" | grep -q "^$SNIPPET_TMP/"
```
<!-- snippet: timeout=5 -->
```sh
exit 3
```
<!-- snippet: timeout=1 -->
```sh
sleep 100 & sleep 30
```
<!-- snippet: group=g broker=default background ready=socket -->
```sh
sleep 1000
```
<!-- snippet: group=g expect="channels" socket=/tmp/tb-self.sock -->
```console
$ tensorbus stat --socket /tmp/tb-self.sock
output, not run
```
<!-- snippet: group=g file=x.c -->
```c
#include <tensorbus.h>
int main(void) { return tb_status_str(0) ? 0 : 1; }
```
<!-- snippet: group=g cwd=tmp -->
```sh
test -f x.c && test -d examples
```
<!-- snippet: skip reason="a reason" -->
```sh
false
```
<!-- snippet: skip -->
```sh
true
```
<!-- snippet: bogus=1 -->
```sh
true
```
```
no language
```
```text
diagram
```
```toml
[[pools]]
name = "p"
slot_size = "64KiB"
slots = 4
```
```toml
[limits]
max_channels = "many"
```
```sh
tensorbus stat --socket /tmp/not-declared.sock
```
<!-- snippet: expect="absent" -->
```python
print("present")
```
"""
SELF_TEST_WANT = [
    "pass", "FAIL", "TIMEOUT", "started", "pass", "pass", "pass", "skip", "FAIL", "FAIL", "FAIL", "text",
    "pass", "FAIL", "FAIL", "FAIL",
]


def self_test(venv: Path) -> int:
    """Runs the driver on blocks whose results are known; 0 when each gives what it must."""
    with tempfile.TemporaryDirectory(prefix="tbsnip-self-") as d:
        md = Path(d) / "self.md"
        md.write_text(SELF_TEST)
        runner = Runner(venv, keep=False, verbose=False)
        try:
            for g in select([str(md)]):
                runner.run_group(g)
        finally:
            runner.cleanup()
        got = [r.status for r in runner.results]
        bad = [
            f"{r.block.where}: {r.status} ({r.note}), expected {w}"
            for r, w in zip(runner.results, SELF_TEST_WANT)
            if r.status != w
        ]
        if len(got) != len(SELF_TEST_WANT):
            bad.append(f"{len(got)} blocks, expected {len(SELF_TEST_WANT)}")
        if LIVE:
            bad.append(f"process groups left running: {sorted(LIVE)}")
        for line in bad:
            print(f"self-test: {line}")
        ok = sum(r.status == w for r, w in zip(runner.results, SELF_TEST_WANT))
        print(f"self-test: {ok} passed, {len(bad)} failed")
        return 1 if bad else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("sel", nargs="*", help="FILE or FILE:LINE (default: " + ", ".join(DOC_FILES) + ")")
    ap.add_argument("--venv", default=str(ROOT / "target" / "snippets-venv"), help="venv for Python blocks")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directories")
    ap.add_argument("--verbose", "-v", action="store_true", help="print every block's output")
    ap.add_argument("--list", action="store_true", help="list the blocks and their markers, run nothing")
    ap.add_argument("--self-test", action="store_true", help="check the driver on blocks of known outcome")
    args = ap.parse_args()
    if args.self_test:
        return self_test(Path(args.venv))
    groups = select(args.sel)
    if args.list:
        for g in groups:
            for b in g.blocks:
                m = "(no marker)" if b.marker is None else " ".join(
                    k if v == [""] else " ".join(f"{k}={shlex.quote(x)}" for x in v) for k, v in b.marker.items()
                )
                print(f"{b.where}\t{b.lang or '-'}\t{m}")
        return 0
    runner = Runner(Path(args.venv), args.keep, args.verbose)
    atexit.register(runner.cleanup)

    def on_signal(signum: int, _frame: object) -> None:
        runner.cleanup()
        os._exit(128 + signum)

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    for g in groups:
        runner.run_group(g)
    return report(runner.results)


if __name__ == "__main__":
    sys.exit(main())
