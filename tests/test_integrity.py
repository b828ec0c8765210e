"""Integrity and safety (issue 19, items 1-5): checked hashes, finite tensors, the output-folder lock,
failed starts, file modes, byte-identical safetensors."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import pytest
import torch
import yaml
from conftest import ROOT, toy_recipe
from safetensors.torch import load_file

from cstoolkit import Decomposer, Decomposition
from cstoolkit.cli import main
from cstoolkit.errors import TrainingDiverged, UserError
from cstoolkit.io import atomic_write, safetensors_bytes, save_safetensors
from cstoolkit.lock import LOCK_NAME, FolderLock

VEC = "toy/vec.safetensors"
LORA = "content/pytorch_lora_weights.safetensors"


def _err(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err, err
    return err


def _flip(path, count=16) -> None:
    """Corrupt the last ``count`` bytes (tensor data) of a file, keeping its size."""
    data = bytearray(path.read_bytes())
    for i in range(len(data) - count, len(data)):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def _recipe_file(tmp_path, **sections):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(toy_recipe(tmp_path, **sections)))
    return path


# ------------------------------------------------------------------ 1. hashes and finite tensors
def test_corrupted_file_stops_generate_naming_it(tmp_path, capsys):
    Decomposer.from_recipe(toy_recipe(tmp_path)).run()
    target = tmp_path / "run" / "decomposition" / VEC
    _flip(target)
    assert main(["generate", str(tmp_path / "run"), "--prompt", "A <c> on the beach", "--use", "content",
                 "--out", str(tmp_path / "gen")]) == 2
    err = _err(capsys)
    assert err.startswith(f"cstoolkit: error: DECOMPOSITION: {target} does not match the sha256 in manifest.json")
    assert not (tmp_path / "gen").exists()
    with pytest.raises(UserError, match="--content: .*does not match the sha256"):
        from cstoolkit.combine import combine

        combine(content=tmp_path / "run" / "decomposition")


def _lora_decomposition(value: float = 0.01) -> Decomposition:
    g = torch.Generator().manual_seed(0)
    name = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    state = {f"{name}.lora_A.weight": torch.randn(4, 8, generator=g) * value,
             f"{name}.lora_B.weight": torch.randn(8, 4, generator=g) * value}
    return Decomposition(method="dreambooth_lora", files={LORA: state},
                         file_metadata={LORA: {"format": "pt", "rank": "4"}})


def _export(run, out, capsys, *extra) -> tuple[int, str]:
    code = main(["export", str(run), "--format", "kohya", "--out", str(out), *extra])
    return code, (_err(capsys) if code else capsys.readouterr().out)


def test_export_refuses_corrupted_and_nonfinite_files(tmp_path, capsys):
    run = tmp_path / "balloon"
    _lora_decomposition().save(run / "decomposition")
    code, printed = _export(run, tmp_path / "ok", capsys)
    assert code == 0 and (tmp_path / "ok" / "balloon_content.safetensors").is_file(), printed
    # a flipped byte: named, nothing exported
    target = run / "decomposition" / LORA
    good = target.read_bytes()
    _flip(target)
    code, err = _export(run, tmp_path / "bad", capsys)
    assert code == 2 and f"{target} does not match the sha256" in err
    assert not (tmp_path / "bad").exists()
    target.write_bytes(good)
    # a NaN in a file whose hash matches (written by an older version): refused, nothing exported
    dec = _lora_decomposition()
    key = next(iter(dec.files[LORA]))
    dec.files[LORA][key][0, 0] = float("nan")
    save_safetensors(dec.files[LORA], target, dec.file_metadata[LORA], finite=False)
    manifest = json.loads((run / "decomposition" / "manifest.json").read_text())
    import hashlib

    manifest["files"][LORA]["sha256"] = hashlib.sha256(target.read_bytes()).hexdigest()
    (run / "decomposition" / "manifest.json").write_text(json.dumps(manifest))
    code, err = _export(run, tmp_path / "nan", capsys)
    assert code == 2 and f"tensor '{key}' holds 1 NaN or inf value" in err and str(target) in err
    assert not (tmp_path / "nan").exists()


def test_export_refuses_fp16_overflow(tmp_path, capsys):
    run = tmp_path / "big"
    _lora_decomposition(value=1e6).save(run / "decomposition")  # finite in fp32, inf in fp16
    code, err = _export(run, tmp_path / "fp16", capsys)
    assert code == 2 and err.startswith("cstoolkit: error: --dtype: ") and "try --dtype bf16 or fp32" in err
    assert not (tmp_path / "fp16").exists()
    code, _ = _export(run, tmp_path / "fp32", capsys, "--dtype", "fp32")
    assert code == 0


def test_save_refuses_nonfinite_tensors_before_writing(tmp_path):
    dec = _lora_decomposition()
    key = sorted(dec.files[LORA])[1]
    dec.files[LORA][key][1, 2] = float("inf")
    with pytest.raises(UserError, match=f"decomposition: {LORA}: tensor '{key}' holds 1 NaN or inf value"):
        dec.save(tmp_path / "dec")
    assert not (tmp_path / "dec").exists()
    with pytest.raises(UserError, match="holds 1 NaN"):
        save_safetensors({"x": torch.tensor([1.0, float("nan")])}, tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


# ------------------------------------------------------------------ 2. the output-folder lock
def _hold_lock(folder) -> subprocess.Popen:
    code = ("import sys, time; from cstoolkit.lock import FolderLock; FolderLock(sys.argv[1]).acquire(); "
            "print('locked', flush=True); time.sleep(120)")
    child = subprocess.Popen([sys.executable, "-c", code, str(folder)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert child.stdout.readline().strip() == "locked"
    return child


def test_live_holder_blocks_overwrite_and_resume(tmp_path, capsys):
    recipe = _recipe_file(tmp_path, runtime={"checkpoint_every": 3})
    Decomposer.from_recipe(recipe).run()
    out = tmp_path / "run"
    assert not (out / LOCK_NAME).exists()  # released at the end of the run
    before = (out / "decomposition" / VEC).read_bytes()
    child = _hold_lock(out)
    try:
        for flag in ("--overwrite", "--resume"):
            assert main(["run", str(recipe), flag]) == 2
            assert _err(capsys) == (f"cstoolkit: error: runtime.output_dir: {out} is in use by another cstoolkit "
                                    f"run (PID {child.pid}); wait for it to end or stop it, or set another "
                                    "runtime.output_dir")
        assert (out / "decomposition" / VEC).read_bytes() == before  # untouched
    finally:
        child.kill()
        child.wait()
    # the holder is gone: its lock is taken over
    assert (out / LOCK_NAME).read_text().strip() == str(child.pid)
    assert main(["run", str(recipe), "--overwrite"]) == 0
    assert not (out / LOCK_NAME).exists()


def test_stale_lock_file_of_a_dead_process_is_taken_over(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK_NAME).write_text(dead.stdout)  # no flock held (a fallback file system or a killed holder)
    Decomposer.from_recipe(toy_recipe(tmp_path)).run()
    assert (out / "decomposition" / "manifest.json").is_file() and not (out / LOCK_NAME).exists()


def test_lock_in_one_process_refuses_a_second_holder(tmp_path):
    with FolderLock(tmp_path):
        assert (tmp_path / LOCK_NAME).read_text().strip() == str(os.getpid())
        with pytest.raises(UserError, match=f"PID {os.getpid()}"):
            FolderLock(tmp_path).acquire()
    FolderLock(tmp_path).acquire().release()


# ------------------------------------------------------------------ 3. failed starts
@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_missing_device_fails_before_writing(tmp_path, capsys):
    recipe = _recipe_file(tmp_path)
    assert main(["run", str(recipe), "--set", "runtime.device=cuda"]) == 2
    assert "runtime.device: cuda was asked for but no CUDA GPU is available" in _err(capsys)
    assert not (tmp_path / "run").exists()
    assert main(["run", str(recipe)]) == 0  # the retry needs no flag


def test_failed_or_interrupted_run_is_recorded_and_reusable(tmp_path, monkeypatch):
    out = tmp_path / "run"
    with pytest.raises(TrainingDiverged):  # fails before any checkpoint
        Decomposer.from_recipe(toy_recipe(tmp_path, params={"nan_at": 2})).run()
    status = json.loads((out / "run.json").read_text())
    assert status["status"] == "failed" and "TrainingDiverged" in status["error"]
    from conftest import ToyMethod

    def interrupted(self, *a, **k):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(ToyMethod, "fit", interrupted)
        with pytest.raises(KeyboardInterrupt):
            Decomposer.from_recipe(toy_recipe(tmp_path)).run()  # reused without flags
    assert json.loads((out / "run.json").read_text())["status"] == "interrupted"
    # a run killed outright leaves "running"; no live process holds the folder and it has no checkpoint
    (out / "run.json").write_text(json.dumps({"status": "running", "pid": 999999999}))
    Decomposer.from_recipe(toy_recipe(tmp_path)).run()
    assert json.loads((out / "run.json").read_text())["status"] == "finished"
    # a folder of other files is still refused
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="already holds files"):
        Decomposer.from_recipe(toy_recipe(tmp_path, runtime={"output_dir": str(other)})).run()
    assert (other / "notes.txt").read_text() == "mine" and not (other / LOCK_NAME).exists()


# ------------------------------------------------------------------ 4. file modes
@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_files_and_folders_follow_the_umask(tmp_path, umask_022):
    Decomposer.from_recipe(toy_recipe(tmp_path, runtime={"checkpoint_every": 3})).run()
    out = tmp_path / "run"
    files = [out / "decomposition" / "manifest.json", out / "decomposition" / VEC, out / "grid.png", out / "run.json",
             out / "report.html", out / "samples" / "content" / "a-c-on-the-beach" / "0.png",
             out / "checkpoints" / "toy" / "step-0000003" / "state.safetensors"]
    folders = [out / "checkpoints" / "toy" / "step-0000003", out / "checkpoints" / "toy" / "final"]
    assert {str(p): oct(stat.S_IMODE(p.stat().st_mode)) for p in files} == {str(p): "0o644" for p in files}
    assert {str(p): oct(stat.S_IMODE(p.stat().st_mode)) for p in folders} == {str(p): "0o755" for p in folders}
    os.umask(0o027)
    atomic_write(tmp_path / "x.txt", lambda fh: fh.write("x"), mode="w")
    assert stat.S_IMODE((tmp_path / "x.txt").stat().st_mode) == 0o640


# ------------------------------------------------------------------ 5. byte-identical safetensors
def test_safetensors_bytes_are_the_same_in_every_process(tmp_path):
    code = ("import hashlib, torch; from cstoolkit.io import safetensors_bytes; "
            "m = {k: k * 2 for k in 'format zeta alpha mu kappa beta gamma'.split()}; "
            "print(hashlib.sha256(safetensors_bytes({'b': torch.arange(3.), 'a': torch.ones(2, dtype=torch.int64)}, "
            "m)).hexdigest())")
    digests = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                              check=True).stdout.strip() for _ in range(3)}
    assert len(digests) == 1
    meta = {k: k * 2 for k in "format zeta alpha mu kappa beta gamma".split()}
    save_safetensors({"b": torch.arange(3.0), "a": torch.ones(2, dtype=torch.int64)}, tmp_path / "t.safetensors", meta)
    import hashlib

    assert hashlib.sha256((tmp_path / "t.safetensors").read_bytes()).hexdigest() in digests
    loaded = load_file(str(tmp_path / "t.safetensors"))
    assert torch.equal(loaded["b"], torch.arange(3.0)) and loaded["a"].dtype == torch.int64
    data = safetensors_bytes({"x": torch.zeros(1)}, meta)
    header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])
    assert list(header["__metadata__"]) == sorted(meta)
