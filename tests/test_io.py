"""Images a user will give: every mode converts to 8-bit RGB; what cannot work is a clear error."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from cstoolkit.errors import UserError
from cstoolkit.io import image_to_tensor, load_image, make_grid, slugify


def _save(tmp_path, im, name, **kw):
    path = tmp_path / name
    im.save(path, **kw)
    return path


def test_grayscale_rgba_cmyk_16bit(tmp_path):
    gray = load_image(_save(tmp_path, Image.new("L", (80, 70), 100), "g.png"))
    assert gray.mode == "RGB" and gray.getpixel((0, 0)) == (100, 100, 100)
    rgba = Image.new("RGBA", (80, 80), (255, 0, 0, 0))
    rgba.paste((0, 0, 255, 255), (0, 0, 40, 80))
    out = load_image(_save(tmp_path, rgba, "a.png"))
    assert out.getpixel((60, 10)) == (255, 255, 255)  # transparent -> white
    assert out.getpixel((10, 10)) == (0, 0, 255)
    cmyk = load_image(_save(tmp_path, Image.new("CMYK", (64, 64), (0, 255, 255, 0)), "c.jpg", quality=100))
    r, g, b = cmyk.getpixel((5, 5))
    assert r > 200 and g < 60 and b < 60
    arr = np.full((66, 66), 65535 // 2, dtype=np.uint16)
    sixteen = load_image(_save(tmp_path, Image.fromarray(arr), "s.png"))
    assert sixteen.mode == "RGB" and abs(sixteen.getpixel((1, 1))[0] - 128) <= 1
    la = Image.new("LA", (64, 64), (0, 0))
    assert load_image(_save(tmp_path, la, "la.png")).getpixel((0, 0)) == (255, 255, 255)
    pal = Image.new("P", (64, 64), 3)
    assert load_image(_save(tmp_path, pal, "p.png")).mode == "RGB"


def test_exif_rotation_is_applied(tmp_path):
    im = Image.new("RGB", (100, 64), (0, 255, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    path = tmp_path / "rot.jpg"
    im.save(path, exif=exif.tobytes())
    assert load_image(path).size == (64, 100)


def test_bad_files_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="file not found"):
        load_image(tmp_path / "nope.png")
    (tmp_path / "junk.png").write_bytes(b"not an image at all")
    with pytest.raises(UserError, match="cannot read"):
        load_image(tmp_path / "junk.png")
    with pytest.raises(UserError, match="at least 64 px"):
        load_image(_save(tmp_path, Image.new("RGB", (200, 32)), "thin.png"), where="inputs.image")
    truncated = tmp_path / "trunc.png"
    data = (_save(tmp_path, Image.new("RGB", (128, 128), (1, 2, 3)), "full.png")).read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError) as err:
        load_image(truncated)
    assert err.value.where == "inputs.image"


def test_tensor_crop_and_helpers():
    t = image_to_tensor(Image.new("RGB", (200, 100), (255, 0, 0)), 64)
    assert t.shape == (3, 64, 64) and float(t[0].min()) == 1.0 and float(t[1].max()) == -1.0
    assert slugify("A <c> on the beach!") == "a-c-on-the-beach"
    grid = make_grid([[Image.new("RGB", (10, 10))] * 2, [Image.new("RGB", (10, 10))]], pad=2)
    assert grid.size == (2 * 12 + 2, 2 * 12 + 2)
