"""`lorax -q` / `lorax -v` and the shared flags (issue 16): every bar follows one switch, and a command
leaves the process's logging and torch settings as it found them."""

from __future__ import annotations

import logging

import pytest
import torch

from exporter.cli.main import main
from lorax_common import log
from lorax_common.scoped import logger_level, torch_threads


def run(argv, capsys) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def _logging_state() -> list[tuple]:
    return [(lg.level, lg.propagate, tuple(lg.handlers)) for lg in map(logging.getLogger, log.PACKAGES)]


def test_quiet_silences_every_bar_and_normal_shows_them(nf4_adapter, tmp_path, capsys):
    before = _logging_state()
    rc, out, err = run(["merge", nf4_adapter, "--out", tmp_path / "normal"], capsys)
    assert rc == 0 and "merge:" in err and "tensor" in err  # the merge's progress bar
    rc, out, err = run(["-q", "merge", nf4_adapter, "--out", tmp_path / "quiet"], capsys)
    assert rc == 0 and err == "", err  # nothing on stderr, the result line still on stdout
    assert out.startswith("merged ") and "(base: quantized" in out
    # the two merges wrote the same bytes: -q changes what is said, never what is built
    a, b = (tmp_path / "normal" / "model.safetensors"), (tmp_path / "quiet" / "model.safetensors")
    assert a.read_bytes() == b.read_bytes()
    assert _logging_state() == before  # no handler or level left behind on lorax's loggers
    assert log.current() == log.NORMAL


def test_verbose_shows_the_module_of_a_warning(nf4_adapter, tmp_path, capsys):
    # a leftover staging dir of an interrupted run is cleaned with a warning (lorax_common.outputs)
    out = tmp_path / "m"
    (tmp_path / ".m.abcd1234.tmp").mkdir()
    rc, _, err = run(["-v", "merge", nf4_adapter, "--out", out], capsys)
    assert rc == 0
    assert "WARNING lorax_common.outputs: removed 1 staging entry" in err, err
    rc, _, err = run(["-v", "-q", "merge", nf4_adapter, "--out", tmp_path / "x"], capsys)
    assert rc == 2 and "contradict" in err


def test_size_flag_is_checked_by_the_parser(nf4_adapter, tmp_path, capsys):
    rc, _, err = run(["merge", nf4_adapter, "--out", tmp_path / "m", "--max-shard-size", "12XB"], capsys)
    assert rc == 2 and "'12XB' is not a size" in err
    assert not (tmp_path / "m").exists()
    rc, _, _ = run(["-q", "merge", nf4_adapter, "--out", tmp_path / "s", "--max-shard-size", "20KB"], capsys)
    assert rc == 0 and len(list((tmp_path / "s").glob("model-*-of-*.safetensors"))) > 1  # 20 KB shards


def test_scoped_settings_come_back_after_an_error():
    threads = torch.get_num_threads()
    with pytest.raises(RuntimeError), torch_threads(1) as before:
        assert before == threads and torch.get_num_threads() == 1
        raise RuntimeError("inside")
    assert torch.get_num_threads() == threads
    lg = logging.getLogger("torch.onnx")
    level = lg.level
    with pytest.raises(RuntimeError), logger_level("torch.onnx", logging.ERROR):
        assert lg.level == logging.ERROR
        raise RuntimeError("inside")
    assert lg.level == level


def test_options_build_refuses_a_flag_no_field_takes():
    from exporter.cli.options import build
    from exporter.merge.api import MergeOptions

    assert build(MergeOptions, {"dtype": "float32"}, verify=False) == MergeOptions(dtype="float32", verify=False)
    with pytest.raises(TypeError, match="no field for typo"):
        build(MergeOptions, {"typo": 1})


def test_quiet_check_silences_the_libraries_too(nf4_adapter, tmp_path, capsys):
    """transformers' weight-loading bars, bitsandbytes' kernel notices and library warnings follow -q,
    and come back after the command."""
    from transformers.utils import logging as hf_logging

    from exporter.merge.api import MergeOptions, merge_adapter

    merged = merge_adapter(nf4_adapter, tmp_path / "m", MergeOptions(progress=False))
    capsys.readouterr()
    assert hf_logging.is_progress_bar_enabled()
    levels = {n: logging.getLogger(n).level for n in log.QUIET_LIBRARIES}
    rc, out, err = run(["-q", "check", nf4_adapter, merged, "--floor", "off"], capsys)
    assert rc == 0 and err == "", err
    assert "# lorax parity report: PASSED" in out and "| hf |" in out  # the verdict is the result: still printed
    assert hf_logging.is_progress_bar_enabled()
    assert {n: logging.getLogger(n).level for n in log.QUIET_LIBRARIES} == levels
    rc, _, err = run(["check", nf4_adapter, merged, "--floor", "off"], capsys)
    assert rc == 0 and "Loading weights" in err  # without -q the same command does show them
