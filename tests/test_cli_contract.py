"""The CLI's output and error contract (issue 13), fault by fault, through exporter.cli.main.

Exit codes: 0 passed, 1 gate failed, 2 bad input or environment (one line), 3 internal error (one line +
a log file). Outputs never destroy inputs, belong to one run, and never half-exist. Each test names the
finding it covers; kill -9 recovery (finding 3) is in tests/test_crash_recovery.py.
"""

from __future__ import annotations

import errno
import hashlib
import json
import shutil
import struct
from pathlib import Path

import pytest

from exporter.cli.main import main
from lorax_common import outputs


def digest(root: Path) -> dict[str, str]:
    """sha256 of every file under root (or of root itself): the proof an input was left alone."""
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def run(argv: list[str], capsys) -> tuple[int, str]:
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return rc, err


def error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith(("error:", "Error:", "internal error:"))]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture(scope="module")
def gguf_file(tiny_model_dir: Path, tmp_path_factory) -> Path:
    from formats.gguf.export import GGUFOptions, export_gguf

    out = tmp_path_factory.mktemp("gguf")
    return export_gguf(tiny_model_dir, out, ["f32"], GGUFOptions(check_tokenizer=False, progress=False)).files[0].path


@pytest.fixture(scope="module")
def bad(tiny_model_dir: Path, nf4_adapter: Path, gguf_file: Path, tmp_path_factory) -> dict[str, Path]:
    """One damaged copy of each input lorax reads (the originals are session fixtures, never touched)."""
    root = tmp_path_factory.mktemp("bad")
    p: dict[str, Path] = {"root": root}

    def copy(src: Path, name: str) -> Path:
        dst = root / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, dst)
        return dst

    data = gguf_file.read_bytes()
    p["gguf_truncated"] = root / "truncated.gguf"
    p["gguf_truncated"].write_bytes(data[: len(data) // 2])
    p["gguf_garbage"] = root / "garbage.gguf"
    p["gguf_garbage"].write_bytes(b"GGUF" + b"\xff" * 64)
    p["base_st_truncated"] = copy(tiny_model_dir, "base_st_truncated")
    st = p["base_st_truncated"] / "model.safetensors"
    st.write_bytes(st.read_bytes()[:200])
    p["base_st_oversized"] = copy(tiny_model_dir, "base_st_oversized")
    st = p["base_st_oversized"] / "model.safetensors"
    st.write_bytes(struct.pack("<Q", 1 << 40) + st.read_bytes()[8:])
    for name, entry in (("index_escape", "../../x.safetensors"), ("index_absolute", "/etc/passwd")):
        d = p[name] = copy(tiny_model_dir, name)
        (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"lm_head.weight": entry}}))
    p["ad_list_config"] = copy(nf4_adapter, "ad_list_config")
    (p["ad_list_config"] / "adapter_config.json").write_text("[1, 2]\n")
    p["ad_bad_tokenizer"] = copy(nf4_adapter, "ad_bad_tokenizer")
    (p["ad_bad_tokenizer"] / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    p["ad_bad_eval"] = copy(nf4_adapter, "ad_bad_eval")
    (p["ad_bad_eval"] / "eval.jsonl").write_bytes(b'{"text": "caf\xe9 ok"}\n')
    p["ad_no_base"] = copy(nf4_adapter, "ad_no_base")
    (p["ad_no_base"] / "lorax.json").unlink()
    cfg = json.loads((p["ad_no_base"] / "adapter_config.json").read_text())
    (p["ad_no_base"] / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": None}))
    p["data_latin1"] = root / "latin1.jsonl"
    p["data_latin1"].write_bytes(b'{"text": "ok"}\n{"text": "na\xefve"}\n')
    p["yaml_latin1"] = root / "latin1.yaml"
    p["yaml_latin1"].write_bytes(b"lr: 0.001\n# caf\xe9\n")
    p["thresholds_bad"] = root / "thresholds.yaml"
    p["thresholds_bad"].write_text("kld_mean: [0.1\n")
    p["thresholds_text"] = root / "thresholds_text.yaml"
    p["thresholds_text"].write_text("kld_mean: lots\n")
    p["train_data"] = root / "train.jsonl"
    p["train_data"].write_text('{"text": "hello world"}\n{"text": "more text"}\n')
    return p


# finding -> (argv with {placeholders}, text the one error line must contain)
BAD_INPUTS: list[tuple[str, list[str], str]] = [
    ("4 damaged GGUF to check", ["check", "{ad}", "{gguf_truncated}"], "truncated.gguf"),
    ("4 damaged GGUF to check (header)", ["check", "{ad}", "{gguf_garbage}"], "garbage.gguf: GGUF header"),
    ("4 damaged GGUF to baseline save", ["baseline", "save", "{gguf_truncated}", "--prompts", "{train_data}",
                                         "--out", "{root}/b.json"], "truncated.gguf"),
    ("4 a JSONL file as --baseline", ["baseline", "compare", "{gguf_garbage}", "--baseline", "{train_data}"],
     "train.jsonl is not valid JSON"),
    ("4 truncated safetensors header", ["merge", "{ad}", "--base", "{base_st_truncated}", "--out", "{root}/m1"],
     "model.safetensors: truncated"),
    ("4 oversized safetensors header", ["merge", "{ad}", "--base", "{base_st_oversized}", "--out", "{root}/m2"],
     "header claims 1099511627776 bytes"),
    ("4 non-UTF-8 training data", ["train", "--base", "{base}", "--data", "{data_latin1}", "--out", "{root}/t1"],
     "latin1.jsonl:2: not UTF-8"),
    ("4 non-UTF-8 YAML config", ["train", "--config", "{yaml_latin1}"], "latin1.yaml:2: not UTF-8"),
    ("4 non-UTF-8 eval.jsonl", ["check", "{ad_bad_eval}", "{base}"], "eval.jsonl:1: not UTF-8"),
    ("4 adapter_config.json is a JSON list", ["merge", "{ad_list_config}", "--out", "{root}/m3"],
     "adapter_config.json holds a JSON list"),
    ("4 invalid --thresholds YAML", ["check", "{ad}", "{base}", "--thresholds", "{thresholds_bad}"],
     "thresholds.yaml:2: not valid YAML"),
    ("4 --thresholds value not a number", ["check", "{ad}", "{base}", "--thresholds", "{thresholds_text}"],
     "kld_mean: expected a number"),
    ("4 --lr-scheduler typo", ["train", "--base", "{base}", "--data", "{train_data}", "--out", "{root}/t2",
                               "--lr-scheduler", "cosin"], "did you mean 'cosine'?"),
    ("4 --optim typo", ["train", "--base", "{base}", "--data", "{train_data}", "--out", "{root}/t3",
                        "--optim", "adamw"], "is not a transformers OptimizerNames"),
    ("4 --batch-size 0", ["train", "--batch-size", "0"], "--batch-size"),
    ("4 --lr -1", ["train", "--lr", "-1"], "--lr"),
    ("4 --lr 0 in YAML too", ["train", "--config", "{root}/lr0.yaml", "--print-config"], "'lr' must be > 0"),
    ("5 broken tokenizer.json, merge", ["merge", "{ad_bad_tokenizer}", "--out", "{root}/m4"],
     "ad_bad_tokenizer/tokenizer.json is not valid JSON"),
    ("5 broken tokenizer.json, export", ["export", "{ad_bad_tokenizer}", "--out", "{root}/d1", "--gguf"],
     "ad_bad_tokenizer/tokenizer.json is not valid JSON"),
    ("5 broken tokenizer.json, check", ["check", "{ad_bad_tokenizer}", "{base}"],
     "ad_bad_tokenizer/tokenizer.json is not valid JSON"),
    ("7 index entry outside the dir (..)", ["merge", "{ad}", "--base", "{index_escape}", "--out", "{root}/m5",
                                            "--no-verify-base"], "points outside"),
    ("7 index entry outside the dir (/etc)", ["merge", "{ad}", "--base", "{index_absolute}", "--out", "{root}/m6",
                                              "--no-verify-base"], "'/etc/passwd' points outside"),
    ("7 --max-samples -2", ["check", "{ad}", "{base}", "--max-samples", "-2"], "--max-samples"),
    ("7 --gen-tokens 0", ["export", "{ad}", "--out", "{root}/d2", "--gguf", "--gen-tokens", "0"], "--gen-tokens"),
    ("7 --gen-tokens 0, baseline", ["baseline", "save", "{base}", "--prompts", "{train_data}", "--out",
                                    "{root}/b2.json", "--gen-tokens", "0"], "--gen-tokens"),
]


def test_every_bad_input_is_exit_2_with_one_line_naming_it(bad, nf4_adapter, tiny_model_dir, capsys):
    """Findings 4, 5, 7: each bad input -> exit 2, one line naming the file/flag, no traceback, no output."""
    (bad["root"] / "lr0.yaml").write_text("lr: 0\n")
    names = {k: str(v) for k, v in bad.items()} | {"ad": str(nf4_adapter), "base": str(tiny_model_dir)}
    before = digest(tiny_model_dir) | digest(nf4_adapter)
    wrong = []
    for finding, argv, needle in BAD_INPUTS:
        rc, err = run([a.format(**names) for a in argv], capsys)
        line = error_line(err) if err.strip() else "(nothing on stderr)"
        if rc != 2 or needle not in line:
            wrong.append(f"{finding}: rc {rc}, {line!r}")
    assert wrong == [], "\n".join(wrong)
    assert not any((bad["root"] / n).exists() for n in ("m1", "m2", "m3", "m4", "m5", "m6", "d1", "d2", "t1"))
    assert digest(tiny_model_dir) | digest(nf4_adapter) == before


def test_plain_peft_adapter_without_base_is_refused_even_inside_a_model_dir(bad, tiny_model_dir, monkeypatch,
                                                                            capsys):
    """Finding 6: Path("") was ".", so run from inside a model dir it merged against that model."""
    monkeypatch.chdir(tiny_model_dir)
    rc, err = run(["merge", bad["ad_no_base"], "--trained-on", "nf4", "--out", bad["root"] / "m7"], capsys)
    assert rc == 2 and "records no base model" in error_line(err) and "pass --base DIR" in err
    assert not (bad["root"] / "m7").exists()


@pytest.mark.parametrize("case", ["export --out ADAPTER", "merge --out BASE", "merge --out PARENT-OF-BASE",
                                  "import-gguf --out DIR-OF-GGUF", "export --out SYMLINK-TO-ADAPTER"])
def test_force_never_deletes_an_input(case, nf4_adapter, tiny_model_dir, gguf_file, tmp_path, capsys):
    """Finding 1: an --out that is, contains or lies inside an input is refused, --force or not."""
    ad = tmp_path / "ad"
    shutil.copytree(nf4_adapter, ad)
    base = tmp_path / "models" / "base"
    shutil.copytree(tiny_model_dir, base)
    gdir = tmp_path / "gdir"
    gdir.mkdir()
    shutil.copy(gguf_file, gdir / "m.gguf")
    (tmp_path / "link").symlink_to(ad)
    argv = {
        "export --out ADAPTER": ["export", ad, "--out", ad, "--gguf"],
        "merge --out BASE": ["merge", ad, "--base", base, "--out", base],
        "merge --out PARENT-OF-BASE": ["merge", ad, "--base", base, "--out", tmp_path / "models"],
        "import-gguf --out DIR-OF-GGUF": ["import-gguf", gdir / "m.gguf", "--out", gdir],
        "export --out SYMLINK-TO-ADAPTER": ["export", ad, "--out", tmp_path / "link", "--gguf"],
    }[case]
    before = digest(tmp_path)
    for force in ([], ["--force"]):
        rc, err = run([*argv, *force], capsys)
        assert rc == 2, err
        assert "input" in error_line(err) and "--out" in err
    assert digest(tmp_path) == before


def test_a_second_run_on_a_locked_out_fails_at_once_and_stale_staging_waits(nf4_adapter, tmp_path, capsys):
    """Finding 2 (two runs to one --out) and 3 (debris swept only when no live run owns it)."""
    out = tmp_path / "merged"
    stale = tmp_path / ".merged.k3j9x0ab.tmp"
    other = tmp_path / ".merged.v2.k3j9x0ab.tmp"  # another output's (merged.v2) staging: never touched
    other.mkdir()
    with outputs.output_lock(out):  # a live run owns `out` and is building in `stale`
        stale.mkdir()
        (stale / "model.safetensors").write_bytes(b"\0" * 2_000_000)
        rc, err = run(["merge", nf4_adapter, "--out", out], capsys)
        assert rc == 2 and "being written by another lorax run" in error_line(err)
        assert stale.exists() and not out.exists()
    rc, err = run(["merge", nf4_adapter, "--out", out], capsys)
    assert rc == 0, err
    assert "removed 1 staging entry" in err and "(2.0 MB)" in err
    assert not stale.exists() and other.exists() and (out / "lorax.json").is_file()
    assert not (tmp_path / ".merged.lock").exists()


def test_an_out_that_appears_during_the_run_is_not_replaced(nf4_adapter, tmp_path, monkeypatch, capsys):
    """Finding 2: the final rename replaced whatever appeared at --out since the start."""
    import exporter.merge.io as merge_io

    out = tmp_path / "merged"
    real = merge_io.write_support_files

    def intruder(*args, **kwargs):  # someone else writes --out while the merge runs
        out.mkdir()
        (out / "theirs.txt").write_text("mine")
        return real(*args, **kwargs)

    monkeypatch.setattr(merge_io, "write_support_files", intruder)
    rc, err = run(["merge", nf4_adapter, "--out", out], capsys)
    assert rc == 2 and "appeared while this run was building it" in error_line(err)
    assert [p.name for p in out.iterdir()] == ["theirs.txt"] and (out / "theirs.txt").read_text() == "mine"
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]  # no staging, no lock left


def test_disk_full_is_exit_2_naming_the_output_and_leaves_nothing(nf4_adapter, tmp_path, monkeypatch, capsys):
    """Finding 4: ENOSPC while the shards are written (planted in the writer's own write call)."""
    import formats.hf.writer as hf_writer

    def full(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(hf_writer.ShardedWriter, "_emit", full)
    rc, err = run(["merge", nf4_adapter, "--out", tmp_path / "merged"], capsys)
    assert rc == 2
    line = error_line(err)
    assert "No space left on device" in line and str(tmp_path / "merged") in line and "free disk space" in line
    assert list(tmp_path.iterdir()) == []


def test_unwritable_outputs_fail_before_any_work(nf4_adapter, tiny_model_dir, monkeypatch, capsys):
    """Finding 4: read-only/permission-denied --out and --report; check --report is tested before the gate."""
    import exporter.gate.check

    def gate_must_not_run(*args, **kwargs):
        raise AssertionError("the gate ran before --report was found unwritable")

    monkeypatch.setattr(exporter.gate.check, "check", gate_must_not_run)
    rc, err = run(["check", nf4_adapter, tiny_model_dir, "--report", "/sys/lorax-report"], capsys)
    assert rc == 2 and "--report /sys/lorax-report is not writable" in error_line(err)
    rc, err = run(["merge", nf4_adapter, "--out", "/sys/lorax-merged"], capsys)
    assert rc == 2 and "cannot write /sys/lorax-merged" in error_line(err)


def test_output_files_follow_the_umask(tiny_model_dir, tmp_path):
    """Finding 7: GGUFs were 0600 (mkstemp) while every other output followed the umask."""
    from formats.gguf.export import GGUFOptions, export_gguf

    files = export_gguf(tiny_model_dir, tmp_path / "g", ["f32", "q4_k_m"], GGUFOptions(check_tokenizer=False, progress=False))
    expect = 0o666 & ~outputs.umask()
    assert {f.path.name: f.path.stat().st_mode & 0o777 for f in files} == {
        "model-f32.gguf": expect, "model-q4_k_m.gguf": expect}


def test_exit_codes_0_1_2_3(nf4_adapter, tiny_model_dir, tmp_path, monkeypatch, capsys):
    """The contract: 0 passed, 1 gate failed (and nothing else), 2 bad input, 3 internal error + log."""
    assert main(["--help"]) == 0
    assert "Exit codes:" in capsys.readouterr().out
    # 1: a real drift: the base without the adapter, gated against the trained model
    rc, err = run(["check", nf4_adapter, tiny_model_dir, "--max-samples", "1"], capsys)
    assert rc == 1 and "parity gate failed for hf:" in error_line(err)
    # 2: bad input, and click's usage errors too
    assert run(["merge", tmp_path / "missing", "--out", tmp_path / "m"], capsys)[0] == 2
    assert run(["merge", "--no-such-flag"], capsys)[0] == 2
    # 3: a bug: one line with the log path; the traceback is in the log, not on the terminal
    import exporter.merge.api

    def bug(*args, **kwargs):
        raise ZeroDivisionError("planted bug")

    monkeypatch.setattr(exporter.merge.api, "build_plan", bug)
    monkeypatch.setenv("LORAX_CACHE", str(tmp_path / "cache"))
    rc, err = run(["merge", nf4_adapter, "--out", tmp_path / "m"], capsys)
    assert rc == 3
    line = error_line(err)
    assert line.startswith("internal error: ZeroDivisionError: planted bug (traceback in ")
    log = Path(line.split("traceback in ")[1].split(";")[0])
    assert log.parent == tmp_path / "cache" / "logs"
    assert "Traceback" in log.read_text() and "planted bug" in log.read_text()
    assert not (tmp_path / "m").exists()


def test_artifact_with_a_smaller_vocabulary_is_a_gate_failure(nf4_adapter, tiny_model_dir, tmp_path, capsys):
    """Finding 4: an artifact with a smaller vocabulary crashed the gate (IndexError / llama_decode -1)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.resize_token_embeddings(256)
    model.save_pretrained(tmp_path / "small")
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(tmp_path / "small")
    rc, err = run(["check", nf4_adapter, tmp_path / "small", "--max-samples", "1"], capsys)
    assert rc == 1, err
