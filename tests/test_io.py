"""The savers' file-system helpers (adapter_engine._io)."""

import os

import pytest

from adapter_engine._io import atomic_folder_write, is_other_format_weights


@pytest.mark.parametrize("umask, mode", [(0o022, 0o755), (0o027, 0o750), (0o077, 0o700)])
def test_the_written_folder_has_the_umasks_mode(tmp_path, umask, mode):
    """As a folder the user makes (mkdtemp would give 0700 whatever the umask), new or replacing one."""
    old = os.umask(umask)
    try:
        for _ in range(2):  # new, then replacing
            atomic_folder_write(tmp_path / "out", lambda folder: open(os.path.join(folder, "f"), "w").close())
            assert (tmp_path / "out").stat().st_mode & 0o777 == mode
    finally:
        os.umask(old)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_file_is_not_replaced_by_a_folder(tmp_path):
    (tmp_path / "out").write_text("mine")

    def write(folder):
        raise AssertionError("wrote before checking the path")

    with pytest.raises(FileExistsError, match="is a file, not a folder"):
        atomic_folder_write(tmp_path / "out", write)
    assert (tmp_path / "out").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_failed_final_move_puts_the_previous_folder_back(tmp_path, monkeypatch):
    """The previous folder was moved aside before the new one moved in; when that last move failed, the error left
    neither at the path (the previous one stayed in a hidden .out.old-* folder)."""
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "model.safetensors").write_text("previous")
    rename = os.rename

    def failing(src, dst):
        if ".partial-" in os.fspath(src):
            raise OSError("disk went away")
        rename(src, dst)

    monkeypatch.setattr(os, "rename", failing)
    with pytest.raises(OSError, match="disk went away"):
        atomic_folder_write(tmp_path / "out", lambda folder: open(os.path.join(folder, "f"), "w").close())
    assert (tmp_path / "out" / "model.safetensors").read_text() == "previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_weight_files_of_other_formats():
    for name in ("pytorch_model.bin", "pytorch_model-00001-of-00002.bin", "pytorch_model.bin.index.json",
                 "tf_model.h5", "tf_model.h5.index.json", "flax_model.msgpack", "model.pt", "model.pth"):  # fmt: skip
        assert is_other_format_weights(name), name
    for name in ("model.safetensors", "model.safetensors.index.json", "config.json", "tokenizer.json", "vocab.txt",
                 "merges.txt", "special_tokens_map.json"):  # fmt: skip
        assert not is_other_format_weights(name), name
