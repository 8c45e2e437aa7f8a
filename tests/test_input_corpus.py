"""Every bad file gets one line (issue 14): a corpus of hostile and broken inputs.

Each case is a scenario, a site policy, a site config (``site.yaml``) or a site's data file, with
the exit code the documented table gives it (``veil.exits``) and a pattern its last line must
match. Every case runs at the Python API, in-process (quick): the loader raises the error that
carries that exit code, and the message is bounded, free of control characters, and ends with a
line naming the problem. The cases marked ``cli`` also run through the real ``veil`` command as
a subprocess (slow: each imports torch): ``veil simulate`` for scenarios, ``veil site check``
for site configs and data. There the exit code, the last line of stderr, the absence of any
traceback or control character, the output size and, for scenarios, an untouched store (no run
recorded) and no ledger are all checked.
"""

from __future__ import annotations

import os
import re
import sqlite3
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from client.daemon import init_ledger, load_site_config
from client.loaders import load_site_data
from privacy.policy import load_policy
from veil.errors import VeilError
from veil.exits import ExitCode
from veil.spec import load_scenario

VEIL = str(Path(sys.executable).with_name("veil"))
MAX_OUTPUT = 2048  # bytes of stdout and stderr together
CONTROL = re.compile(r"[\x00-\x09\x0b-\x1f\x7f-\x9f]")  # every C0 and C1 control but the newline
PINNED = "0" * 32  # stands for the kit's real ledger id until a case is written
CODES = {"scenario": ExitCode.SCENARIO, "policy": ExitCode.POLICY, "site": ExitCode.SCENARIO,
         "data": ExitCode.DATA}


@dataclass(frozen=True)
class Case:
    """One bad input: its kind, its bytes, the pattern the message's last line must match."""

    name: str
    kind: str  # scenario | policy | site | data (a CSV the kit's site.yaml points at)
    body: bytes
    expect: str
    cli: bool = False

    @property
    def code(self) -> ExitCode:
        return CODES[self.kind]


def _site_yaml(**over: Any) -> bytes:
    cfg: dict[str, Any] = {
        "site_id": "clinic-a", "data": {"format": "csv", "path": "data.csv", "label": "label"},
        "ledger": "clinic.ledger", "ledger_id": PINNED,
        "policy": {"epsilon_cap": 10.0, "trusted_researchers": ["researchers"]}, "device": "cpu",
        "coordinator": {"address": "127.0.0.1:8000", "root_certificates": "certs/ca.crt", "node_key": "node"}}
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    return yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True).encode()


def _csv(*rows: str) -> bytes:
    return ("a,b,c,d,label\n" + "".join(r + "\n" for r in rows)).encode()


GOOD_ROWS = [f"{i % 7},{i % 5},{i % 3},{i % 2},{'xyz'[i % 3]}" for i in range(30)]
LAUGHS = b"".join(
    [b'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n']
    + [f"{c}: &{c} [{','.join([f'*{p}'] * 9)}]\n".encode() for p, c in zip("abcdefgh", "bcdefghi", strict=True)])
PRIVACY = b"privacy:\n  noise_multiplier: null\n"

CASES = [
    # -- scenarios: the YAML reader -------------------------------------------------------------
    Case("billion-laughs", "scenario", LAUGHS, r"line 2, column \d+: YAML aliases \(\*a\) are not allowed",
         cli=True),
    Case("alias-merge", "scenario", b"base: &b {sites: 2}\nfederation:\n  <<: *b\n", r"aliases \(\*b\)"),
    Case("duplicate-key-nested", "scenario", b"federation:\n  rounds: 2\n  sites: 3\n  rounds: 4\n",
         r"line 4, column 3: duplicate key 'rounds' \(first given at line 2\)", cli=True),
    Case("duplicate-key-top", "scenario", b"seed: 1\nname: x\nseed: 2\n", r"line 3.*duplicate key 'seed'"),
    Case("duplicate-key-deep", "scenario",
         b"federation: {sites: 3}\nsite_policy_overrides:\n  site-1:\n    epsilon_cap: 1\n    epsilon_cap: 2\n",
         r"line 5.*duplicate key 'epsilon_cap' \(first given at line 4\)"),
    Case("latin-1", "scenario", "name: café\n".encode("latin-1"), r"is not UTF-8 text \(byte 0xe9 at line 1\)",
         cli=True),
    Case("utf-16", "scenario", "name: x\n".encode("utf-16"), r"is not UTF-8 text \(byte 0xff"),
    Case("empty", "scenario", b"", r"scenario file .* is empty; ", cli=True),
    Case("only-comments", "scenario", b"# a scenario\n# (to be written)\n", r"is empty; "),
    Case("only-null", "scenario", b"~\n", r"is empty; "),
    Case("top-level-list", "scenario", b"- federation\n- rounds\n", r"the top level must be a mapping .*got list"),
    Case("nul-byte", "scenario", b"name: a\x00b\n", r"line 1: the character '\\x00' is not allowed"),
    Case("raw-escape-byte", "scenario", b"name: ok\nseed: 1\x1b[31m\n",
         r"line 2: the character '\\x1b' is not allowed", cli=True),
    Case("deep-nesting", "scenario", b"a: " + b"[" * 2000 + b"]" * 2000 + b"\n", r"nested deeper than 20 levels",
         cli=True),
    Case("long-string", "scenario", b"name: " + b"x" * 5000 + b"\n",
         r"a value of 5,000 characters; at most 4,096"),
    Case("huge-file", "scenario", b"# " + b"x" * 1_200_000 + b"\n", r"larger than 1,000,000 bytes", cli=True),
    Case("too-many-values", "scenario", b"seed: [" + b"1," * 20_000 + b"1]\n", r"more than 10,000 values"),
    Case("python-tag", "scenario", b'name: !!python/object/apply:os.system ["echo pwned"]\n',
         r"could not determine a constructor for the tag"),
    Case("bad-date", "scenario", b"seed: 2024-13-45\n", r"cannot read the value '2024-13-45' \(month must be"),
    Case("bool-key", "scenario", b"true: 1\n", r"the key 'true' is not a name"),
    Case("unclosed", "scenario", b"federation: [unclosed\n", r"not valid YAML: line 2, column 1: while parsing"),
    # -- scenarios: numbers as YAML 1.2 reads them (YAML 1.1 would turn each into a quiet int) -----
    Case("sexagesimal-seed", "scenario", b"seed: 1:20\n",
         r"^  seed: Input should be a valid integer \(got '1:20'\)$"),
    Case("underscore-rounds", "scenario", b"federation:\n  rounds: 1_0\n",
         r"rounds: .*valid integer \(got '1_0'\)"),
    Case("hex-clip", "scenario", b"privacy:\n  noise_multiplier: 1.0\n  max_grad_norm: 0x10\n",
         r"max_grad_norm: Input should be a valid number \(got '0x10'\)"),
    Case("binary-sites", "scenario", b"federation:\n  sites: 0b11\n", r"sites: .*valid integer \(got '0b11'\)"),
    Case("yes-as-bool", "scenario", b"site_policy:\n  require_encryption: yes\n",
         r"require_encryption: .*valid boolean \(got 'yes'\)"),
    # -- scenarios: types and ranges ------------------------------------------------------------
    Case("count-as-string", "scenario", b"federation:\n  rounds: '3'\n",
         r"^  federation\.rounds: Input should be a valid integer \(got '3'\)$", cli=True),
    Case("count-as-float", "scenario", b"federation:\n  sites: 3.0\n", r"federation\.sites: .*valid integer"),
    Case("count-as-bool", "scenario", b"federation:\n  rounds: true\n", r"federation\.rounds: .*valid integer"),
    Case("float-as-string", "scenario", b"training:\n  learning_rate: '0.1'\n", r"learning_rate: .*valid number"),
    Case("float-as-bool", "scenario", b"training:\n  momentum: false\n", r"momentum: .*valid number"),
    Case("target-epsilon-inf", "scenario", PRIVACY + b"  target_epsilon: .inf\n",
         r"privacy\.target_epsilon: Input should be a finite number", cli=True),
    Case("noise-nan", "scenario", b"privacy:\n  noise_multiplier: .nan\n", r"privacy\.noise_multiplier: .*finite"),
    Case("clip-1e308", "scenario", b"privacy:\n  noise_multiplier: 1.0\n  max_grad_norm: 1e308\n",
         r"max_grad_norm: Input should be less than or equal to 1000"),
    Case("delta-half", "scenario", b"privacy:\n  noise_multiplier: 1.0\n  delta: 0.5\n",
         r"delta: .*or equal to 0\.1"),
    Case("noise-tiny", "scenario", b"privacy:\n  noise_multiplier: 0.001\n", r"greater than or equal to 0\.3"),
    Case("target-huge", "scenario", PRIVACY + b"  target_epsilon: 1e6\n", r"less than or equal to 100"),
    Case("steps-that-hang", "scenario", b"federation:\n  rounds: 10000\ntraining:\n  batch_size: 1\n",
         r"DP-SGD steps .* at most 1,000,000", cli=True),
    Case("gradients-oom", "scenario",
         b"model: {arch: mlp, in_features: 200000}\ntraining: {batch_size: 1000}\n", r"GiB"),
    Case("name-escapes", "scenario", b'name: "\\e]0;pwned\\a\\e[2J"\n',
         r"name: must not contain control .*found '\\x1b'", cli=True),
    Case("name-bidi", "scenario", 'name: "run\u202egnp.exe"\n'.encode(), r"found '\\u202e'"),
    Case("unknown-key-escapes", "scenario", b'"fed\\e[2Jeration": {}\n',
         r"fed\\x1b\[2Jeration: unknown key; allowed keys here: data, device", cli=True),
    Case("huge-echoed-value", "scenario", b"seed: [" + b",".join([b"x" * 400] * 2000) + b"]\n",
         r"seed: Input should be a valid integer \(got \['x.{0,80}$", cli=True),
    Case("many-errors", "scenario", b"federation:\n" + b"".join(f"  k{i}: 1\n".encode() for i in range(100)),
         r"^  \.\.\. and 90 more$", cli=True),
    Case("keys-and-params", "scenario", b"encryption: {aggregation: ckks, keys: ks, scale_bits: 40}\n",
         r"not both \(got \['scale_bits'\]\)"),
    Case("unknown-sites", "scenario", b"federation: {sites: 2}\nsite_policy_overrides:\n"
         + b"".join(f"  '{'s' * 1000}{i}': {{}}\n".encode() for i in range(200)), r"unknown sites \[.*, \.\.\.\]"),
    Case("cap-tiny", "scenario", b"site_policy:\n  epsilon_cap: 1e-300\n",
         r"site_policy\.epsilon_cap: Input should be greater than or equal to 0\.01", cli=True),
    Case("fraction-train-tiny", "scenario", b"federation:\n  fraction_train: 1e-9\n",
         r"fraction_train: Input should be greater than or equal to 0\.001"),
    Case("update-norm-tiny", "scenario", b"robustness:\n  rule: norm-bound\n  max_update_norm: 1e-300\n",
         r"max_update_norm: Input should be greater than or equal to 0\.000001"),
    Case("test-fraction-tiny", "scenario", b"data:\n  test_fraction: 1e-300\n",
         r"test_fraction: Input should be greater than or equal to 0\.01"),
    Case("test-fraction-all", "scenario", b"data:\n  test_fraction: 0.99999999\n",
         r"test_fraction: Input should be less than or equal to 0\.9"),
    # -- site policies (load_policy) ---------------------------------------------------------------
    Case("policy-cap-as-string", "policy", b"policy:\n  epsilon_cap: '10'\n",
         r"policy\.epsilon_cap: Input should be a valid number \(got '10'\)"),
    Case("policy-empty-section", "policy", b"policy:\n", r"site policy .* is empty"),
    Case("policy-empty-file", "policy", b"\n\n", r"site policy file .* is empty"),
    Case("policy-delta-inf", "policy", b"delta: .inf\n", r"policy\.delta: Input should be a finite number"),
    Case("policy-duplicate", "policy", b"epsilon_cap: 1\nepsilon_cap: 2\n", r"duplicate key 'epsilon_cap'"),
    Case("policy-noise-as-bool", "policy", b"min_noise_multiplier: true\n", r"valid number \(got True\)"),
    Case("policy-researcher-escape", "policy", b'trusted_researchers: ["alice\\e[8m.pub"]\n',
         r"trusted_researchers\.0: must not contain control"),
    # -- site configs (site.yaml) ------------------------------------------------------------------
    Case("site-duplicate-key", "site", _site_yaml() + b"site_id: clinic-b\n", r"duplicate key 'site_id'",
         cli=True),
    Case("site-id-newline", "site", _site_yaml(site_id="clinic\n"), r"site_id: String should match pattern"),
    Case("site-label-in-features", "site", _site_yaml(data={"features": ["a", "b", "label"]}),
         r"label column 'label' is also listed in data\.features", cli=True),
    Case("site-policy-cap-as-string", "site", _site_yaml(policy={"epsilon_cap": "10"}),
         r"policy\.epsilon_cap: Input should be a valid number \(got '10'\)", cli=True),
    Case("site-empty", "site", b"# site.yaml\n", r"site config file .* is empty"),
    Case("site-seed-as-float", "site", _site_yaml(split_seed=1.0), r"split_seed: Input should be a valid integer"),
    Case("site-port-as-string", "site", _site_yaml(runtime_port="9094"), r"runtime_port: .*valid integer"),
    Case("site-address-escape", "site", _site_yaml(coordinator={"address": "\x1b[2J:80"}),
         r"coordinator\.address: must not contain control"),
    Case("site-path-escape", "site", _site_yaml(ledger="a\x07.ledger"), r"ledger: must not contain control"),
    Case("site-fraction-inf", "site", _site_yaml(test_fraction=float("inf")), r"test_fraction: .*finite"),
    Case("site-id-dotdot", "site", _site_yaml(site_id=".."), r"site_id: String should match pattern"),
    Case("site-id-hidden", "site", _site_yaml(site_id=".clinic"), r"site_id: String should match pattern"),
    Case("site-fraction-tiny", "site", _site_yaml(test_fraction=1e-300),
         r"test_fraction: .*greater than or equal"),
    Case("site-octal-seed", "site", _site_yaml().replace(b"site_id:", b"split_seed: 0o17\nsite_id:"),
         r"split_seed: Input should be a valid integer \(got '0o17'\)"),
    # -- data files (site check: the data check fails) --------------------------------------------
    Case("csv-ragged-row", "data", _csv(*GOOD_ROWS[:2], "1,2,3,4,x,9", *GOOD_ROWS[2:]),
         r"data-csv-ragged-row\.csv: line 4 has 6 fields but the header has 5", cli=True),
    Case("csv-non-numeric", "data", _csv(*GOOD_ROWS, "1,high,3,4,x"),
         r"column 'b' is not numeric .*'high'", cli=True),
    Case("csv-inf-cell", "data", _csv(*GOOD_ROWS, "1,2,inf,4,x"), r"1 missing or infinite values .* record 30"),
    Case("csv-nan-cell", "data", _csv(*GOOD_ROWS, "1,2,NaN,4,x"),
         r"column 'c' has 1 missing values, first at record 30"),
    Case("csv-one-class", "data", _csv(*(r[:-1] + "x" for r in GOOD_ROWS)),
         r"every record has the label 'x'; a classifier needs at least two classes", cli=True),
    Case("csv-empty", "data", b"", r"the file is empty \(not even a header row\)", cli=True),
    Case("csv-header-only", "data", _csv(), r"the data set is empty"),
    Case("csv-duplicate-header", "data", b"a,a,c,d,label\n" + _csv(*GOOD_ROWS).split(b"\n", 1)[1],
         r"the header names column 'a' 2 times"),
    Case("csv-no-label-column", "data", b"a,b,c,d,outcome\n" + _csv(*GOOD_ROWS).split(b"\n", 1)[1],
         r"no column 'label'; columns are 'a', 'b', 'c', 'd', 'outcome'"),
    Case("csv-escape-in-cell", "data", _csv(*GOOD_ROWS, "1\x1b[2J,2,3,4,x"),
         r"column 'a' is not numeric .*'1\\x1b\[2J'", cli=True),
    Case("csv-label-escape", "data", _csv(*GOOD_ROWS, "1,2,3,4,x\x1b[2J"),
         r"the label 'x\\x1b\[2J' holds a control or bidi character", cli=True),
    Case("csv-label-bidi", "data", _csv(*GOOD_ROWS, "1,2,3,4,\u202eyx"), r"the label '\\u202eyx' holds a control"),
    Case("csv-2pow70", "data", _csv(*GOOD_ROWS, f"1,{2**70},3,4,x"),
         r"features hold 1 values beyond ±1e\+20 \(first at record 30, column 'b'\)"),
    Case("csv-missing-label", "data", _csv(*GOOD_ROWS, "1,2,3,4,"), r"label column 'label' has 1 missing values"),
]
CLI_CASES = [c for c in CASES if c.cli]


def test_the_corpus_is_large_and_the_cli_part_small() -> None:
    assert len(CASES) >= 40 and len({c.name for c in CASES}) == len(CASES)
    assert 15 <= len(CLI_CASES) <= 25
    assert len(LAUGHS) < 400  # 9^8 "lol"s once expanded: the 226 MB error message of the campaign


def test_an_alias_bomb_is_refused_at_once_in_little_memory(tmp_path: Path) -> None:
    import time
    import tracemalloc

    f = tmp_path / "bomb.yaml"
    f.write_bytes(LAUGHS)
    tracemalloc.start()
    start = time.perf_counter()
    with pytest.raises(VeilError, match="aliases"):
        load_scenario(f)
    elapsed, (_, peak) = time.perf_counter() - start, tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert elapsed < 2 and peak < 10_000_000


# -- the site kit: a site.yaml whose every check passes but the one a case breaks -------------------
@pytest.fixture(scope="module")
def kit(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    from privacy.requests import create_researcher_key
    from veil.cli.pki import create_certs, create_node_key

    base = tmp_path_factory.mktemp("site-kit")
    create_certs(base / "certs", ["127.0.0.1"])
    create_node_key(base / "node")
    create_researcher_key(base / "alice")
    (base / "researchers").mkdir()
    (base / "researchers" / "alice.pub").write_bytes((base / "alice.pub").read_bytes())
    (base / "data.csv").write_bytes(_csv(*GOOD_ROWS))
    (base / "site.yaml").write_bytes(_site_yaml().replace(f"ledger_id: '{PINNED}'\n".encode(), b""))
    init_ledger(base / "site.yaml")
    ledger_id = load_site_config(base / "site.yaml").ledger_id
    assert ledger_id is not None
    return base, ledger_id


def _write(case: Case, kit: tuple[Path, str], where: Path) -> Path:
    """The case's file: a scenario or policy in ``where``; a site.yaml (and its CSV) in the kit."""
    base, ledger_id = kit
    if case.kind in ("scenario", "policy"):
        f = where / f"{case.name}.yaml"
        f.write_bytes(case.body)
        return f
    f = base / f"site-{case.name}.yaml"
    body = case.body
    if case.kind == "data":
        (base / f"data-{case.name}.csv").write_bytes(case.body)
        body = _site_yaml(data={"path": f"data-{case.name}.csv"})
    f.write_bytes(body.replace(PINNED.encode(), ledger_id.encode()))
    return f


def _load(case: Case, path: Path) -> None:
    if case.kind == "scenario":
        load_scenario(path)
    elif case.kind == "policy":
        load_policy(path)
    elif case.kind == "site":
        load_site_config(path)
    else:
        load_site_data(load_site_config(path).data)


def _assert_clean(text: str) -> None:
    assert "Traceback" not in text
    assert not CONTROL.search(text), f"control character in {text[:300]!r}"
    assert len(text.encode()) < MAX_OUTPUT, f"{len(text.encode())} bytes: {text[:300]!r}"


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_the_loader_names_the_problem_in_a_bounded_clean_message(case: Case, kit: tuple[Path, str],
                                                                  tmp_path: Path) -> None:
    path = _write(case, kit, tmp_path)
    with pytest.raises(VeilError) as info:
        _load(case, path)
    message = str(info.value)
    assert info.value.exit_code == case.code, message
    _assert_clean(message)
    assert re.search(case.expect, message.splitlines()[-1]), message


# -- the same files through the real CLI ------------------------------------------------------------
def _run(case: Case, kit: tuple[Path, str], where: Path) -> subprocess.CompletedProcess[str]:
    where.mkdir()
    path = _write(case, kit, where)
    if case.name == "missing-file":
        path.unlink()
    if case.kind == "scenario":
        cmd = [VEIL, "simulate", str(path), "--store", f"sqlite:///{where / 'runs.db'}",
               "--ledger-dir", str(where / "ledgers"), "--artifacts-dir", str(where / "artifacts")]
    else:
        cmd = [VEIL, "site", "check", "--config", str(path)]
    env = {**os.environ, "COLUMNS": "120", "NO_COLOR": "1"}
    return subprocess.run(cmd, cwd=where, env=env, capture_output=True, text=True, timeout=300, check=False)


MISSING = Case("missing-file", "scenario", b"", r"scenario file not found: .*missing-file\.yaml", cli=True)


@pytest.fixture(scope="module")
def cli_runs(kit: tuple[Path, str], tmp_path_factory: pytest.TempPathFactory
             ) -> dict[str, tuple[subprocess.CompletedProcess[str], Path]]:
    """Every CLI case, three at a time (each process spends seconds importing torch)."""
    root = tmp_path_factory.mktemp("cli")
    cases = [*CLI_CASES, MISSING]
    with ThreadPoolExecutor(max_workers=3) as pool:
        done = list(pool.map(lambda c: _run(c, kit, root / c.name), cases))
    return {c.name: (proc, root / c.name) for c, proc in zip(cases, done, strict=True)}


@pytest.mark.slow  # ~20 subprocesses, three at a time: about a minute
@pytest.mark.parametrize("case", [*CLI_CASES, MISSING], ids=[c.name for c in [*CLI_CASES, MISSING]])
def test_the_cli_exits_with_its_code_and_one_line_and_writes_nothing(
        case: Case, cli_runs: dict[str, tuple[subprocess.CompletedProcess[str], Path]]) -> None:
    proc, where = cli_runs[case.name]
    out = proc.stdout + proc.stderr
    assert proc.returncode == case.code, out
    _assert_clean(out)
    last = proc.stderr.rstrip("\n").splitlines()[-1]
    assert re.search(case.expect, last), out
    if case.kind == "data":  # the failed check's line on stdout, and a summary as the last line
        assert last.startswith("error: site check failed: data: ") and "FAIL data" in proc.stdout
    if case.kind != "scenario":
        return
    store = where / "runs.db"
    if store.exists():  # a scenario refused before the store: nothing was recorded
        with sqlite3.connect(store) as db:
            assert db.execute("select count(*) from runs").fetchone() == (0,)
    ledgers = where / "ledgers"
    assert not ledgers.exists() or not any(ledgers.iterdir()), "a ledger was created for a refused scenario"


# -- files that are not files: FIFOs, devices, directories, symlink loops (checked before open) -------
def _unblock(fifo: Path) -> None:
    """Should a regression open ``fifo`` for reading, hand it EOF instead of hanging the suite."""
    import threading

    def writer() -> None:
        with open(fifo, "wb"):
            pass

    threading.Thread(target=writer, daemon=True).start()


def _loop(where: Path) -> Path:
    (where / "loop-a").symlink_to(where / "loop-b")
    (where / "loop-b").symlink_to(where / "loop-a")
    return where / "loop-a"


def _special(kind: str, where: Path) -> tuple[Path, str]:
    """A path of ``kind`` and the words its error must use."""
    if kind == "fifo":
        os.mkfifo(where / "pipe")
        _unblock(where / "pipe")
        return where / "pipe", r"is a FIFO \(named pipe\), not a regular file"
    if kind == "device":
        return Path("/dev/zero"), r"/dev/zero is a device, not a regular file"
    if kind == "directory":
        (where / "dir").mkdir()
        return where / "dir", r"is a directory, not a regular file"
    return _loop(where), r"symlink loop"


SPECIAL = ["fifo", "device", "directory", "loop"]


@pytest.mark.parametrize("kind", SPECIAL)
def test_a_scenario_that_is_not_a_regular_file_is_one_line(kind: str, tmp_path: Path) -> None:
    path, words = _special(kind, tmp_path)
    with pytest.raises(VeilError) as info:
        load_scenario(path)
    assert info.value.exit_code == ExitCode.SCENARIO and re.search(words, str(info.value))
    _assert_clean(str(info.value))


@pytest.mark.parametrize("kind", SPECIAL)
def test_site_data_that_is_not_a_regular_file_is_one_line(kind: str, kit: tuple[Path, str],
                                                          tmp_path: Path) -> None:
    path, words = _special(kind, tmp_path)
    source = load_site_config(kit[0] / "site.yaml").data.model_copy(update={"path": path})
    with pytest.raises(VeilError) as info:
        load_site_data(source)
    assert info.value.exit_code == ExitCode.DATA and re.search(words, str(info.value))
    _assert_clean(str(info.value))


@pytest.mark.parametrize("field", ["root_certificates", "node_key"])
@pytest.mark.parametrize("kind", SPECIAL)
def test_a_ca_or_node_key_that_is_not_a_regular_file_fails_its_check(
        field: str, kind: str, kit: tuple[Path, str], tmp_path: Path) -> None:
    from client.daemon import preflight

    path, words = _special(kind, tmp_path)
    cfg = load_site_config(kit[0] / "site.yaml")
    cfg = cfg.model_copy(update={"coordinator": cfg.coordinator.model_copy(update={field: path})})
    name = "ca certificate" if field == "root_certificates" else "node key"
    check = next(c for c in preflight(cfg) if c.name == name)
    assert not check.ok and re.search(words, check.detail), check.detail
    _assert_clean(check.detail)


def test_a_huge_ca_certificate_is_not_read_whole(kit: tuple[Path, str], tmp_path: Path) -> None:
    from client.daemon import preflight

    big = tmp_path / "ca.crt"
    with open(big, "wb") as fh:
        fh.truncate(50_000_000)  # sparse: a regular file far larger than any certificate
    cfg = load_site_config(kit[0] / "site.yaml")
    cfg = cfg.model_copy(update={"coordinator": cfg.coordinator.model_copy(update={"root_certificates": big})})
    check = next(c for c in preflight(cfg) if c.name == "ca certificate")
    assert not check.ok and "larger than 1,000,000 bytes" in check.detail


@pytest.mark.parametrize("field", ["root_certificates", "node_key"])
def test_a_site_config_naming_a_fifo_for_ca_or_node_key_is_refused(field: str, kit: tuple[Path, str],
                                                                    tmp_path: Path) -> None:
    path, words = _special("fifo", tmp_path)
    config = tmp_path / "site.yaml"
    config.write_bytes(_site_yaml(coordinator={field: str(path)}).replace(PINNED.encode(), kit[1].encode()))
    with pytest.raises(VeilError) as info:
        load_site_config(config)
    assert info.value.exit_code == ExitCode.SCENARIO
    assert re.search(f"coordinator.{field} .*{words}", str(info.value)), str(info.value)


@pytest.mark.parametrize("kind", ["fifo", "directory", "loop"])
def test_a_ledger_that_is_not_a_regular_file_is_a_ledger_error(kind: str, tmp_path: Path) -> None:
    from privacy.ledger import SiteLedger

    path, words = _special(kind, tmp_path)
    with pytest.raises(VeilError) as info:
        SiteLedger(path, site_id="clinic-a", create=False)
    assert info.value.exit_code == ExitCode.LEDGER and re.search(words, str(info.value))
    _assert_clean(str(info.value))


@pytest.mark.parametrize(("option", "kind", "code", "words"), [
    ("artifacts", "file", ExitCode.ERROR, r"--artifacts-dir .* is a regular file, not a directory"),
    ("artifacts", "loop", ExitCode.ERROR, r"--artifacts-dir .*symlink loop"),
    ("ledgers", "file", ExitCode.LEDGER, r"--ledger-dir .* is a regular file, not a directory"),
    ("ledgers", "loop", ExitCode.LEDGER, r"--ledger-dir .*symlink loop"),
    ("ledgers", "device", ExitCode.LEDGER, r"--ledger-dir /dev/zero is a device, not a directory"),
])
def test_simulate_refuses_an_unusable_directory_before_anything_runs(
        option: str, kind: str, code: ExitCode, words: str, tmp_path: Path) -> None:
    from simulations.simulate import check_runnable
    from veil.spec import Scenario

    dirs = {"artifacts": tmp_path / "artifacts", "ledgers": tmp_path / "ledgers"}
    if kind == "file":
        dirs[option].write_text("not a directory\n")
    elif kind == "loop":
        dirs[option] = _loop(tmp_path)
    else:
        dirs[option] = Path("/dev/zero")
    scenario = Scenario.model_validate({"federation": {"sites": 2, "rounds": 1}, "model": {"arch": "mlp"}})
    with pytest.raises(VeilError) as info:
        check_runnable(scenario, dirs["ledgers"], dirs["artifacts"])
    assert info.value.exit_code == code and re.search(words, str(info.value)), str(info.value)
    _assert_clean(str(info.value))
    assert not (tmp_path / "ledgers").is_dir() or not any((tmp_path / "ledgers").iterdir())


def test_simulate_makes_missing_directories_and_checks_they_are_writable(tmp_path: Path) -> None:
    from simulations.simulate import check_runnable
    from veil.spec import Scenario

    scenario = Scenario.model_validate({"federation": {"sites": 2, "rounds": 1}, "model": {"arch": "mlp"}})
    check_runnable(scenario, tmp_path / "a" / "ledgers", tmp_path / "b" / "artifacts")
    assert not any((tmp_path / "a" / "ledgers").iterdir()) and not any((tmp_path / "b" / "artifacts").iterdir())


@pytest.mark.slow  # four CLI runs, each importing torch
def test_the_cli_never_blocks_on_a_fifo_and_refuses_bad_directories_writing_nothing(
        kit: tuple[Path, str], tmp_path: Path) -> None:
    base = tmp_path / "base.yaml"
    base.write_text("name: tiny\nseed: 0\ndevice: cpu\nfederation: {sites: 2, rounds: 1, min_sites: 2}\n"
                    "model: {arch: mlp}\nprivacy: {target_epsilon: 8.0}\n")
    os.mkfifo(tmp_path / "scenario.yaml")
    os.mkfifo(tmp_path / "data.csv")
    (tmp_path / "afile").write_text("x\n")
    site = kit[0] / "site-fifo-data.yaml"
    body = _site_yaml(data={"path": str(tmp_path / "data.csv")})
    site.write_bytes(body.replace(PINNED.encode(), kit[1].encode()))
    loop = _loop(tmp_path)
    env = {**os.environ, "COLUMNS": "120", "NO_COLOR": "1"}

    Run = tuple[subprocess.CompletedProcess[str], Path]

    def simulate(scenario: Path, name: str, ledgers: Path, artifacts: Path) -> Run:
        store = tmp_path / f"{name}.db"
        cmd = [VEIL, "simulate", str(scenario), "--store", f"sqlite:///{store}", "--ledger-dir", str(ledgers),
               "--artifacts-dir", str(artifacts)]
        return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
                              check=False, stdin=subprocess.DEVNULL), store

    runs = {
        "fifo-scenario": (simulate(tmp_path / "scenario.yaml", "s1", tmp_path / "l1", tmp_path / "a1"),
                          ExitCode.SCENARIO, r"is a FIFO \(named pipe\), not a regular file", tmp_path / "l1"),
        "artifacts-file": (simulate(base, "s2", tmp_path / "l2", tmp_path / "afile"), ExitCode.ERROR,
                           r"--artifacts-dir .*afile is a regular file, not a directory", tmp_path / "l2"),
        "ledgers-loop": (simulate(base, "s3", loop, tmp_path / "a3"), ExitCode.LEDGER,
                         r"--ledger-dir .*symlink loop", tmp_path / "l3"),
    }
    for name, ((proc, store), code, words, ledgers) in runs.items():
        out = proc.stdout + proc.stderr
        assert proc.returncode == code, (name, out)
        _assert_clean(out)
        assert re.search(words, proc.stderr.rstrip("\n").splitlines()[-1]), (name, out)
        if store.exists():
            with sqlite3.connect(store) as db:
                assert db.execute("select count(*) from runs").fetchone() == (0,), name
        assert not ledgers.exists() or not any(ledgers.iterdir()), name
    ca_fifo = kit[0] / "site-fifo-ca.yaml"
    body = _site_yaml(coordinator={"root_certificates": str(tmp_path / "data.csv")})
    ca_fifo.write_bytes(body.replace(PINNED.encode(), kit[1].encode()))
    for config, code, words in [(site, ExitCode.DATA, r"^error: site check failed: data: .*is a FIFO"),
                                (ca_fifo, ExitCode.SCENARIO, r"coordinator\.root_certificates .* is a FIFO")]:
        proc = subprocess.run([VEIL, "site", "check", "--config", str(config)], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=120, check=False, stdin=subprocess.DEVNULL)
        assert proc.returncode == code, proc.stdout + proc.stderr
        _assert_clean(proc.stdout + proc.stderr)
        assert re.search(words, proc.stderr.splitlines()[-1]), proc.stdout + proc.stderr
