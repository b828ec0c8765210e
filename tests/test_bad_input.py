"""Bad input as a new user gives it (issue 9 item 6): one line naming the field, exit 2, nothing written.

Every case goes through ``cli.main`` with the toy method of conftest (no model is built).
"""

from __future__ import annotations

import errno
import shutil
import struct
import zlib
from pathlib import Path

import pytest
import torch
import yaml
from conftest import toy_recipe

from cstoolkit import Decomposer
from cstoolkit.cli import main


def _error(capsys) -> str:
    """The one line ``cstoolkit: error: ...`` on stderr (and nothing else, no traceback)."""
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("cstoolkit: error: ") and "Traceback" not in err[0]
    return err[0][len("cstoolkit: error: "):]


def _recipe(tmp_path: Path, **sections) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(toy_recipe(tmp_path, **sections)))
    return path


def _png_header(width: int, height: int) -> bytes:
    """A PNG file claiming ``width`` x ``height`` pixels (Pillow checks the size when it opens it)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs /proc (Linux)")
def test_output_dir_that_cannot_be_created(tmp_path, capsys):
    code = main(["run", str(_recipe(tmp_path)), "--set", "runtime.output_dir=/proc/nope/run"])
    assert code == 2
    assert _error(capsys).startswith("runtime.output_dir: cannot create or write to /proc/nope/run")
    assert not Path("/proc/nope").exists()


def test_output_dir_under_a_file(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    code = main(["run", str(_recipe(tmp_path)), "--set", f"runtime.output_dir={tmp_path / 'file' / 'run'}"])
    assert code == 2
    assert _error(capsys).startswith("runtime.output_dir: ")
    assert (tmp_path / "file").read_text() == "x"


def test_decompression_bomb_image(tmp_path, capsys):
    bomb = tmp_path / "huge.png"
    bomb.write_bytes(_png_header(20000, 20000))
    code = main(["run", str(_recipe(tmp_path, inputs={"image": str(bomb)}))])
    assert code == 2
    line = _error(capsys)
    assert line.startswith("inputs.image: ") and "decompression-bomb" in line and "megapixels" in line
    assert not (tmp_path / "run").exists()


def test_image_over_pillows_warning_limit_is_refused_too(tmp_path, capsys):
    big = tmp_path / "big.png"
    big.write_bytes(_png_header(10000, 10000))  # 100 MP: Pillow only warns (its error starts at 179 MP)
    assert main(["run", str(_recipe(tmp_path, inputs={"image": str(big)}))]) == 2
    assert "decompression-bomb" in _error(capsys)


def test_folder_given_as_image_and_as_recipe(tmp_path, capsys):
    assert main(["run", str(_recipe(tmp_path, inputs={"image": str(tmp_path)}))]) == 2
    assert _error(capsys) == f"inputs.image: {tmp_path} is a folder; expected an image file"
    assert main(["run", str(tmp_path)]) == 2
    assert _error(capsys) == f"{tmp_path}: is a folder; expected a path to a YAML recipe file"
    assert not (tmp_path / "run").exists()


def test_recipe_not_utf8(tmp_path, capsys):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("method: toy\nbackbone: {name: toy}\ninputs: {content: caf\xe9}\n".encode("latin-1"))
    assert main(["run", str(path)]) == 2
    assert _error(capsys) == f"{path}: not a UTF-8 text file; expected a YAML recipe"


def test_unreadable_recipe(tmp_path, capsys, monkeypatch):
    path = _recipe(tmp_path)
    real = Path.read_text

    def denied(self, *args, **kwargs):
        if self == path:
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", denied)  # root reads any file: simulate a chmod 000
    assert main(["run", str(path)]) == 2
    assert _error(capsys) == f"{path}: cannot read the recipe (Permission denied); expected a readable YAML file"


def test_resume_without_checkpoints(tmp_path, capsys):
    path = _recipe(tmp_path)
    assert main(["run", str(path), "--resume"]) == 2
    assert _error(capsys).startswith(f"--resume: {tmp_path / 'run'} holds no checkpoints to resume from")
    assert main(["run", str(path), "--resume", "--overwrite"]) == 2
    assert _error(capsys) == "--resume: --resume and --overwrite were both given; pass one of them"
    assert not (tmp_path / "run").exists()


def test_disk_full_during_a_run(tmp_path, capsys, monkeypatch):
    import cstoolkit.api as api

    def full(path, data):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(api, "write_json", full)
    assert main(["run", str(_recipe(tmp_path))]) == 2
    line = _error(capsys)
    assert line.startswith("runtime.output_dir: cannot write ") and "No space left on device" in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="the machine has a GPU")
def test_cuda_asked_without_a_gpu(tmp_path, capsys):
    assert main(["run", str(_recipe(tmp_path, runtime={"device": "cuda"}))]) == 2
    assert _error(capsys).startswith("runtime.device: cuda was asked for but no CUDA GPU is available")


@pytest.fixture
def finished_run(tmp_path) -> Path:
    Decomposer.from_recipe(toy_recipe(tmp_path)).run()
    return tmp_path / "run"


def test_generate_with_missing_or_broken_files(finished_run, tmp_path, capsys):
    weights = finished_run / "decomposition" / "toy" / "vec.safetensors"
    args = ["generate", str(finished_run), "--prompt", "A <c>", "--out", str(tmp_path / "gen")]
    weights.write_bytes(b"not safetensors")
    assert main(args) == 2
    assert "is not a readable safetensors file" in _error(capsys)
    weights.unlink()
    assert main(args) == 2
    assert _error(capsys) == f"DECOMPOSITION: {weights} is missing; expected every file the manifest lists"
    (finished_run / "decomposition" / "manifest.json").write_text("[1, 2]")
    assert main(args) == 2
    assert "names no method" in _error(capsys)
    shutil.rmtree(finished_run / "decomposition")
    assert main(args) == 2
    assert "has no manifest.json" in _error(capsys)
    assert not (tmp_path / "gen").exists()


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs /proc (Linux)")
def test_generate_into_a_folder_that_cannot_be_made(finished_run, capsys):
    code = main(["generate", str(finished_run), "--prompt", "A <c>", "--use", "content", "--out",
                 "/proc/nope/gen"])
    assert code == 2
    assert _error(capsys).startswith("--out: cannot create or write to /proc/nope/gen")


def test_generate_prompt_checked_before_anything_is_written(finished_run, tmp_path, capsys):
    out = tmp_path / "gen"
    code = main(["generate", str(finished_run), "--prompt", "A <c>", "--prompt", "A dog", "--use", "content",
                 "--out", str(out)])
    assert code == 2
    assert _error(capsys) == "--prompt[1]: 'A dog' has no <c> placeholder; a content prompt must contain <c>"
    assert not out.exists()
