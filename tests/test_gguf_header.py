"""formats/gguf/header.py against gguf-py's own reader: the same values, and damage named in one line."""

from __future__ import annotations

import pytest

from formats.errors import FormatError
from formats.gguf.header import read_values


@pytest.fixture(scope="module")
def gguf_files(tiny_model_dir, tmp_path_factory):
    from formats.gguf.export import GGUFOptions, export_gguf

    out = tmp_path_factory.mktemp("hdr")
    return [f.path for f in export_gguf(tiny_model_dir, out, ["f32", "q8_0", "q4_k_m"], GGUFOptions(progress=False))]


def test_values_equal_gguf_py(gguf_files):
    from gguf import GGUFReader

    for path in gguf_files:
        fields = GGUFReader(path).fields
        keys = {"general.file_type", "general.architecture", "llama.block_count", "tokenizer.ggml.tokens",
                "tokenizer.ggml.eos_token_id"}
        ours = read_values(path, keys)
        assert set(ours) == keys
        for k in keys:
            theirs = fields[k].contents()
            assert ours[k] == theirs, (path.name, k)
    assert [read_values(p, {"general.file_type"})["general.file_type"] for p in gguf_files] == [0, 7, 15]
    assert read_values(gguf_files[0], {"no.such.key"}) == {}


def test_damaged_headers_are_one_line(gguf_files, tmp_path):
    data = gguf_files[0].read_bytes()
    cases = {"bad magic": b"GGUX" + data[4:], "truncated": data[:200], "empty": b""}
    for name, blob in cases.items():
        f = tmp_path / f"{name}.gguf"
        f.write_bytes(blob)
        with pytest.raises(FormatError) as e:
            read_values(f, {"general.file_type", "never.present"})
        assert str(f) in str(e.value) and "\n" not in str(e.value), name


def test_tensor_index_equals_gguf_py(gguf_files):
    """read_header's one pass gives the tensors gguf-py's reader finds: names, types, absolute data offsets and
    byte sizes (the truncation check of formats.gguf.inspect rests on these)."""
    from gguf import GGUFReader

    from formats.gguf.header import read_header
    from formats.gguf.inspect import tensor_bytes

    for path in gguf_files:
        values, tensors, start = read_header(path, {"general.architecture", "general.alignment"})
        theirs = [(t.name, int(t.tensor_type), int(t.data_offset), int(t.n_bytes)) for t in GGUFReader(path).tensors]
        ours = [(n, t, start + off, tensor_bytes(path, n, dims, t)) for n, dims, t, off in tensors]
        assert ours == theirs and len(ours) > 10, path.name
        assert values == {"general.architecture": "llama"}  # general.alignment absent: the 32-byte default


def test_inspect_names_a_file_cut_inside_its_tensor_data(gguf_files, tmp_path):
    """A file whose header is whole but whose last tensor is cut short: the truncation check catches it."""
    from formats.gguf.inspect import inspect_gguf

    data = gguf_files[1].read_bytes()
    assert inspect_gguf(gguf_files[1]).n_tensors > 10
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:-1])
    with pytest.raises(FormatError, match=r"truncated: tensor data ends at byte \d+ but the file has"):
        inspect_gguf(cut)
