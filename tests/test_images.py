"""Tests for aftune.data.images, aftune.data.augment, aftune.data.tiny_images and
scripts/make_tiny_images.py."""

from __future__ import annotations

import importlib.util
import io
import json
from pathlib import Path

import jax
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from PIL import ImageFile

from aftune import errors
from aftune.data import augment
from aftune.data import images
from aftune.data import tiny_images

REPO_ROOT = Path(__file__).resolve().parent.parent
SCRIPT = REPO_ROOT / "scripts" / "make_tiny_images.py"

# An exact resize to the image's own size leaves it unchanged (PIL copies it).
PRE8 = images.Preprocess(image_size=6, stored_size=8, resize="exact")


def png_bytes(x_HxWxC: np.ndarray, fmt: str = "PNG") -> bytes:
  buf = io.BytesIO()
  Image.fromarray(x_HxWxC).save(buf, format=fmt)
  return buf.getvalue()


def solid(value: int, size: int = 8) -> np.ndarray:
  """uint8 [size, size, 3] of one colour, so the stored image tells which file it was."""
  return np.full((size, size, 3), (value, 255 - value, value // 2), np.uint8)


def snapshot(root: Path) -> dict[str, tuple[int, int, bytes]]:
  """Every path under root with its size, mtime and content."""
  out = {}
  for p in sorted(root.rglob("*")):
    st = p.stat()
    out[str(p)] = (st.st_size, st.st_mtime_ns, p.read_bytes() if p.is_file() else b"")
  return out


@pytest.fixture
def folders(tmp_path: Path) -> Path:
  """root/<class>/<image>: classes out of order on disk, names that sort as strings."""
  root = tmp_path / "root"
  layout = {
    "b_dog": {"2.png": 20, "10.png": 10},  # "10.png" sorts before "2.png"
    "a_cat": {"x.PNG": 30},
    "Zebra": {"z.png": 40, "a.png": 50},  # uppercase sorts first
  }
  for cls, files in layout.items():
    (root / cls).mkdir(parents=True)
    for name, value in files.items():
      (root / cls / name).write_bytes(png_bytes(solid(value)))
  (root / "b_dog" / ".DS_Store").write_bytes(b"junk")  # hidden: ignored
  (root / ".hidden_class").mkdir()  # hidden: ignored
  (root / ".hidden_class" / "q.png").write_bytes(b"junk")
  return root


# --- Preprocess ---------------------------------------------------------------------------


def test_preprocess_to_dict_round_trips_through_json():
  pre = images.Preprocess(
    image_size=224,
    stored_size=256,
    resize_size=292,
    resample="bicubic",
    mean=(0.485, 0.456, 0.406),
    std=(0.229, 0.224, 0.225),
  )
  d = json.loads(json.dumps(pre.to_dict()))
  assert d["mean"] == [0.485, 0.456, 0.406]
  assert images.Preprocess.from_dict(d) == pre
  with pytest.raises(errors.ConfigError, match="unknown field"):
    images.Preprocess.from_dict({**d, "crop": 1})


@pytest.mark.parametrize(
  "kwargs, match",
  [
    ({"image_size": 0, "stored_size": 0}, "image_size must be >= 1"),
    ({"image_size": 32, "stored_size": 30}, "must be >= image_size"),
    ({"image_size": 32, "stored_size": 37}, "is odd.*Hugging Face"),
    ({"image_size": 32, "stored_size": 36, "resize": "crop"}, "unknown resize"),
    ({"image_size": 32, "stored_size": 36, "resample": "box"}, "unknown resample"),
    ({"image_size": 32, "stored_size": 36, "std": (0.5, 0.0, 0.5)}, "zero"),
    ({"image_size": 32, "stored_size": 36, "resize_size": 34}, "would need padding"),
    ({"image_size": 32, "stored_size": 36, "resize": "exact", "resize_size": 40}, "only used"),
    ({"image_size": 32, "stored_size": 36, "rescale": 0.0}, "rescale"),
    ({"image_size": 32.0, "stored_size": 36}, "must be an int"),
  ],
)
def test_preprocess_validate_rejects(kwargs, match):
  with pytest.raises(errors.ConfigError, match=match):
    images.Preprocess(**kwargs).validate()


def test_preprocess_image_shortest_edge_resizes_then_center_crops():
  # 20 x 30 (h x w) -> shortest edge 10: 10 x 15, then the central 10 x 10 (left = 2).
  x = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
  pre = images.Preprocess(image_size=8, stored_size=10, resize="shortest_edge")
  resized = np.asarray(Image.fromarray(x).resize((15, 10), Image.Resampling.BILINEAR))
  np.testing.assert_array_equal(images.preprocess_image(Image.fromarray(x), pre), resized[:, 2:12])


def test_preprocess_image_composites_transparency_on_white():
  rgba = np.zeros((8, 8, 4), np.uint8)
  rgba[..., 0] = 200  # red, but fully transparent except one pixel
  rgba[0, 0, 3] = 255
  out = images.preprocess_image(Image.fromarray(rgba), PRE8)
  assert out.dtype == np.uint8 and out.shape == (8, 8, 3)
  assert tuple(out[0, 0]) == (200, 0, 0)
  assert (out[1:] == 255).all()


# --- Class folders ------------------------------------------------------------------------


def test_class_folders_labels_order_and_shapes(folders: Path):
  before = snapshot(folders)
  ds = images.load_class_folders(folders, PRE8)
  assert ds.class_names == ("Zebra", "a_cat", "b_dog")
  assert ds.images.dtype == np.uint8 and ds.images.shape == (5, 8, 8, 3)
  assert ds.labels.dtype == np.int32 and ds.labels.tolist() == [0, 0, 1, 2, 2]
  expected = [
    ("Zebra/a.png", 50),
    ("Zebra/z.png", 40),
    ("a_cat/x.PNG", 30),
    ("b_dog/10.png", 10),
    ("b_dog/2.png", 20),
  ]
  assert ds.sources == tuple(str(folders / name) for name, _ in expected)
  for image, (_, value) in zip(ds.images, expected):
    np.testing.assert_array_equal(image, solid(value))
  assert snapshot(folders) == before  # the loader only reads

  first3 = images.load_class_folders(folders, PRE8, num_samples=3)
  assert first3.labels.tolist() == [0, 0, 1] and first3.class_names == ds.class_names
  np.testing.assert_array_equal(first3.images, ds.images[:3])
  with pytest.raises(errors.ConfigError, match=f"num_samples = 6 .*{folders}.* only 5"):
    images.load_class_folders(folders, PRE8, num_samples=6)
  assert snapshot(folders) == before


def test_class_folders_accept_jpeg_and_resize(folders: Path):
  (folders / "a_cat" / "y.JPEG").write_bytes(png_bytes(solid(90, size=16), fmt="JPEG"))
  ds = images.load_class_folders(folders, PRE8)
  assert ds.sources[3] == str(folders / "a_cat" / "y.JPEG") and ds.labels[3] == 1
  assert np.abs(ds.images[3].astype(int) - solid(90)).max() <= 3  # JPEG is lossy


def test_image_dataset_label_range_names_example_and_head(folders: Path):
  ds = images.load_image_dataset(folders, PRE8, num_classes=3)
  assert len(ds) == 5
  with pytest.raises(errors.InputError, match=r"b_dog/10\.png: label 2 .*head's 2 classes"):
    images.load_image_dataset(folders, PRE8, num_classes=2)


def truncated_png() -> bytes:
  data = png_bytes(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
  return data[: len(data) // 2]


@pytest.mark.parametrize(
  "name, content, match",
  [
    ("bad.png", b"not an image at all", "not a readable image"),
    ("cut.png", truncated_png(), r"not a readable image \(.*truncated"),
    ("notes.txt", b"hello", "not an image file"),
  ],
)
def test_class_folder_errors_name_the_file(folders: Path, name, content, match):
  path = folders / "b_dog" / name
  path.write_bytes(content)
  before = snapshot(folders)
  with pytest.raises(errors.InputError, match=match) as e:
    images.load_class_folders(folders, PRE8)
  assert str(e.value).startswith(f"{path}: ")
  assert snapshot(folders) == before


def test_truncated_image_fails_even_if_pil_allows_truncation(folders: Path, monkeypatch):
  monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
  (folders / "a_cat" / "cut.png").write_bytes(truncated_png())
  with pytest.raises(errors.InputError, match="cut.png: not a readable image"):
    images.load_class_folders(folders, PRE8)
  assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # restored


@pytest.mark.parametrize("size", [12, 16])  # PIL warns above the limit, raises above 2x
def test_decompression_bomb_is_an_input_error(folders: Path, monkeypatch, size):
  monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
  path = folders / "a_cat" / "big.png"
  path.write_bytes(png_bytes(solid(1, size=size)))
  with pytest.raises(errors.InputError, match="too large") as e:
    images.load_class_folders(folders, PRE8)
  assert str(e.value).startswith(f"{path}: ")


def test_class_folder_layout_errors(tmp_path: Path, folders: Path):
  (folders / "c_empty").mkdir()
  with pytest.raises(errors.InputError, match=f"{folders / 'c_empty'}: empty class folder"):
    images.load_class_folders(folders, PRE8)
  (folders / "c_empty" / "nested").mkdir()
  with pytest.raises(errors.InputError, match=f"{folders / 'c_empty' / 'nested'}: not an image"):
    images.load_class_folders(folders, PRE8)
  (tmp_path / "bare").mkdir()
  with pytest.raises(errors.InputError, match="bare: no class folders"):
    images.load_class_folders(tmp_path / "bare", PRE8)
  (tmp_path / "bare" / "stray.png").write_bytes(png_bytes(solid(1)))
  with pytest.raises(errors.InputError, match="stray.png: not a class folder"):
    images.load_class_folders(tmp_path / "bare", PRE8)
  with pytest.raises(errors.InputError, match="missing: not found"):
    images.load_image_dataset(tmp_path / "missing", PRE8, num_classes=2)


# --- Parquet ------------------------------------------------------------------------------


def write_parquet(path: Path, values: list[int], labels: list[int], **kwargs) -> Path:
  """HF's image layout: image struct {bytes, path}, integer label; 2-row row groups."""
  path.parent.mkdir(parents=True, exist_ok=True)
  image = pa.array(
    [{"bytes": png_bytes(solid(v)), "path": f"{v}.png"} for v in values],
    type=pa.struct([("bytes", pa.binary()), ("path", pa.string())]),
  )
  table = pa.table({"image": image, "label": pa.array(labels, pa.int64()), **kwargs})
  pq.write_table(table, path, row_group_size=2)
  return path


def test_parquet_file_and_directory(tmp_path: Path):
  one = write_parquet(tmp_path / "one.parquet", [10, 20, 30, 40, 50], [3, 0, 1, 3, 2])
  ds = images.load_parquet(one, PRE8)
  assert ds.labels.dtype == np.int32 and ds.labels.tolist() == [3, 0, 1, 3, 2]
  assert ds.class_names == ("0", "1", "2", "3")
  assert ds.sources == tuple(f"{one} row {i}" for i in range(5))
  for image, value in zip(ds.images, [10, 20, 30, 40, 50]):
    np.testing.assert_array_equal(image, solid(value))

  root = tmp_path / "hub"
  # Sorted by relative path: data/train-0 before data/train-1, whatever the write order.
  second = write_parquet(root / "data" / "train-1.parquet", [70, 80], [4, 0])
  first = write_parquet(root / "data" / "train-0.parquet", [60, 65, 66], [1, 1, 2])
  (root / "README.md").write_text("dataset card")
  (root / ".cache").mkdir()
  (root / ".cache" / "x.parquet").write_bytes(b"not parquet")  # hidden: skipped
  before = snapshot(root)
  ds = images.load_image_dataset(root, PRE8, num_classes=5)
  assert ds.labels.tolist() == [1, 1, 2, 4, 0] and ds.class_names == tuple("01234")
  assert ds.sources[2:4] == (f"{first} row 2", f"{second} row 0")
  np.testing.assert_array_equal(ds.images[3], solid(70))
  first4 = images.load_parquet(root, PRE8, num_samples=4)
  np.testing.assert_array_equal(first4.images, ds.images[:4])
  assert first4.class_names == tuple("01234")  # from every row's label
  with pytest.raises(errors.ConfigError, match="only 5"):
    images.load_parquet(root, PRE8, num_samples=9)
  with pytest.raises(errors.InputError, match=rf"{second} row 0: label 4 .*head's 4 classes"):
    images.load_image_dataset(root, PRE8, num_classes=4)
  assert snapshot(root) == before


def test_parquet_bad_columns_name_the_file(tmp_path: Path):
  path = tmp_path / "bad.parquet"
  pq.write_table(pa.table({"image": [b"x"], "label": [0]}), path)
  with pytest.raises(errors.InputError, match=f"{path}: column 'image' must be a struct"):
    images.load_parquet(path, PRE8)
  pq.write_table(pa.table({"img": [b"x"], "label": [0]}), path)
  with pytest.raises(errors.InputError, match=f"{path}: missing column 'image'"):
    images.load_parquet(path, PRE8)
  good = write_parquet(tmp_path / "good.parquet", [1], [0])
  t = pq.read_table(good)
  pq.write_table(t.set_column(1, "label", pa.array(["cat"])), path)
  with pytest.raises(errors.InputError, match=f"{path}: column 'label' must be an integer"):
    images.load_parquet(path, PRE8)
  path.write_bytes(b"PAR1 garbage")
  with pytest.raises(errors.InputError, match=f"{path}: not a readable parquet file"):
    images.load_image_dataset(path, PRE8, num_classes=1)


def test_parquet_bad_rows_name_file_and_row(tmp_path: Path):
  path = write_parquet(tmp_path / "t.parquet", [1, 2, 3, 4], [0, 0, 1, 1])
  t = pq.read_table(path)
  structs = t.column("image").to_pylist()
  structs[3]["bytes"] = b"garbage"
  image_type = t.schema.field("image").type
  pq.write_table(t.set_column(0, "image", pa.array(structs, image_type)), path)
  with pytest.raises(errors.InputError, match=f"{path} row 3: not a readable image"):
    images.load_parquet(path, PRE8)
  structs[3]["bytes"] = None
  pq.write_table(t.set_column(0, "image", pa.array(structs, image_type)), path)
  with pytest.raises(errors.InputError, match=f"{path} row 3: image has no embedded bytes"):
    images.load_parquet(path, PRE8)
  pq.write_table(t.set_column(1, "label", pa.array([0, 1, -1, 0])), path)
  with pytest.raises(errors.InputError, match=f"{path} row 2: negative label"):
    images.load_parquet(path, PRE8)


# --- Hugging Face parity ------------------------------------------------------------------


@pytest.fixture(scope="module")
def transformers():
  transformers = pytest.importorskip("transformers")
  transformers.logging.set_verbosity_error()
  return transformers


def hf_processor(transformers, name: str, **kwargs):
  # transformers 5 has a PIL backend per processor (the default one needs torchvision);
  # preprocessor_config.json names the plain class either way.
  cls = getattr(transformers, f"{name}Pil", None) or getattr(transformers, name)
  return cls(**kwargs)


def random_images() -> list[Image.Image]:
  rng = np.random.default_rng(1)
  shapes = [(50, 37), (41, 64), (45, 45), (300, 211)]  # portrait, landscape, square, big
  return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in shapes]


MEAN_STD = {"image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}
PARITY = {
  "vit-32": ("ViTImageProcessor", {"size": {"height": 32, "width": 32}}),
  "vit-default": ("ViTImageProcessor", {}),
  "dinov2-36/32": (
    "BitImageProcessor",
    dict(size={"shortest_edge": 36}, crop_size={"height": 32, "width": 32}, **MEAN_STD),
  ),
  "dinov2-37/32": (
    "BitImageProcessor",
    {
      "size": {"shortest_edge": 37},  # odd margin
      "crop_size": {"height": 32, "width": 32},
    },
  ),
  "dinov2-default": (
    "BitImageProcessor",
    dict(size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224}, **MEAN_STD),
  ),
  "resnet-32": ("ConvNextImageProcessor", {"size": {"shortest_edge": 32}, "crop_pct": 0.875}),
  "resnet-default": (
    "ConvNextImageProcessor",
    dict(size={"shortest_edge": 224}, crop_pct=0.875, **MEAN_STD),
  ),
}


@pytest.mark.parametrize("case", PARITY)
def test_preprocessing_matches_hf_image_processors(transformers, tmp_path: Path, case):
  name, kwargs = PARITY[case]
  processor = hf_processor(transformers, name, **kwargs)
  processor.save_pretrained(tmp_path)
  pre = images.from_hf_preprocessor(tmp_path)
  pil_images = random_images()
  if name == "BitImageProcessor":  # do_convert_rgb: alpha goes onto white, as ours
    rgba = np.random.default_rng(2).integers(0, 256, (40, 47, 4), dtype=np.uint8)
    pil_images += [Image.fromarray(rgba), pil_images[0].convert("L")]
  expected = processor(pil_images, return_tensors="np")["pixel_values"]
  stored = np.stack([images.preprocess_image(im, pre) for im in pil_images])
  assert stored.shape[1:] == (pre.stored_size, pre.stored_size, 3)
  ours = augment.hf_pixel_values(stored, pre)
  assert ours.dtype == np.float32 and ours.shape == expected.shape
  # Bitwise: the in-graph normalisation reproduces HF's float64-then-float32 rounding.
  np.testing.assert_array_equal(ours, expected)


def test_from_hf_preprocessor_fields(transformers, tmp_path: Path):
  hf_processor(
    transformers,
    "BitImageProcessor",
    size={"shortest_edge": 256},
    crop_size={"height": 224, "width": 224},
    **MEAN_STD,
  ).save_pretrained(tmp_path)
  pre = images.from_hf_preprocessor(tmp_path / "preprocessor_config.json")
  assert pre == images.Preprocess(
    image_size=224,
    stored_size=256,
    resize="shortest_edge",
    resize_size=256,
    resample="bicubic",
    mean=(0.485, 0.456, 0.406),
    std=(0.229, 0.224, 0.225),
    rescale=1 / 255,
  )
  # Another resolution: the resize keeps its ratio to the crop, the margin stays even.
  assert images.from_hf_preprocessor(tmp_path, image_size=448).resize_size == 512
  big = images.from_hf_preprocessor(tmp_path, image_size=35)  # round(256 * 35 / 224) = 40
  assert (big.image_size, big.resize_size, big.stored_size) == (35, 40, 39)
  with pytest.raises(errors.ConfigError, match="odd"):
    images.from_hf_preprocessor(tmp_path, stored_size=255)

  resnet = tmp_path / "resnet"
  hf_processor(
    transformers, "ConvNextImageProcessor", size={"shortest_edge": 224}, crop_pct=0.875
  ).save_pretrained(resnet)
  pre = images.from_hf_preprocessor(resnet)
  assert (pre.image_size, pre.resize_size, pre.stored_size, pre.resample) == (
    224,
    256,
    256,
    "bicubic",
  )
  # At 32: what HF does with size {"shortest_edge": 32} (int(32 / 0.875) = 36).
  small = resnet / "small"
  hf_processor(
    transformers, "ConvNextImageProcessor", size={"shortest_edge": 32}, crop_pct=0.875
  ).save_pretrained(small)
  assert images.from_hf_preprocessor(resnet, image_size=32) == images.from_hf_preprocessor(small)
  warp = images.from_hf_preprocessor(resnet, image_size=384)  # HF warps from 384 on
  assert (warp.resize, warp.image_size, warp.stored_size) == ("exact", 384, 384)

  vit = tmp_path / "vit"
  hf_processor(transformers, "ViTImageProcessor").save_pretrained(vit)
  pre = images.from_hf_preprocessor(vit, image_size=384)
  assert (pre.resize, pre.image_size, pre.stored_size) == ("exact", 384, 384)
  assert images.from_hf_preprocessor(vit, stored_size=240).stored_size == 240


def test_from_hf_preprocessor_old_and_bad_files(tmp_path: Path):
  path = tmp_path / "preprocessor_config.json"
  # google/vit-base-patch16-224 as published: a feature extractor with an int size.
  old = {
    "do_normalize": True,
    "do_resize": True,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
    "resample": 2,
    "size": 224,
    "feature_extractor_type": "ViTFeatureExtractor",
  }
  path.write_text(json.dumps(old))
  pre = images.from_hf_preprocessor(tmp_path)
  assert (pre.resize, pre.image_size, pre.stored_size, pre.rescale) == ("exact", 224, 224, 1 / 255)
  for bad, match in [
    ({**old, "feature_extractor_type": "CLIPImageProcessor"}, "unsupported image processor"),
    ({k: v for k, v in old.items() if k != "size"}, "missing field 'size'"),
    ({k: v for k, v in old.items() if k != "feature_extractor_type"}, "image_processor_type"),
    ({**old, "resample": 4}, "unsupported resample"),
    ({**old, "size": {"height": 224, "width": 200}}, "not square"),
    ({**old, "image_mean": [0.5]}, "image_mean"),
  ]:
    path.write_text(json.dumps(bad))
    with pytest.raises(errors.InputError, match=match) as e:
      images.from_hf_preprocessor(path)
    assert str(e.value).startswith(f"{path}: ")
  path.write_text("{")
  with pytest.raises(errors.InputError, match=f"{path}: invalid JSON"):
    images.from_hf_preprocessor(path)


# --- In-graph crop, flip, normalisation ---------------------------------------------------

S, H, PAD, B = 12, 8, 2, 16


def coordinate_images() -> np.ndarray:
  """uint8 [B, S, S, 3]: channel 0 = row + 1, channel 1 = column + 1, channel 2 = image."""
  rows, cols = np.mgrid[1 : S + 1, 1 : S + 1]
  x = np.stack([rows, cols, np.zeros_like(rows)], -1)
  x = np.repeat(x[None], B, 0)
  x[..., 2] = np.arange(B)[:, None, None]
  return x.astype(np.uint8)


def augment_args(**kwargs) -> dict:
  # rescale 1, mean 0, std 1: the output is the cropped pixels themselves.
  args = {
    "image_size": H,
    "mean": (0.0, 0.0, 0.0),
    "std": (1.0, 1.0, 1.0),
    "rescale": 1.0,
    "train": True,
    "random_crop": True,
    "crop_padding": PAD,
    "flip": False,
  }
  return {**args, **kwargs}


def crop_offsets(out_BxHxWx3: np.ndarray) -> list[tuple[int, int]]:
  """Recovers each row's (top, left) in the padded image; asserts the crop is exact."""
  padded = np.pad(coordinate_images(), ((0, 0), (PAD, PAD), (PAD, PAD), (0, 0)))
  offsets = []
  for b, crop in enumerate(np.asarray(out_BxHxWx3).astype(int)):
    # H > 2 * PAD, so the crop's middle pixel is an image pixel: its coordinates locate it.
    m = H // 2
    t, l = crop[m, m, 0] - 1 + PAD - m, crop[m, m, 1] - 1 + PAD - m
    assert 0 <= t <= S + 2 * PAD - H and 0 <= l <= S + 2 * PAD - H, (b, t, l)
    np.testing.assert_array_equal(crop, padded[b, t : t + H, l : l + H], err_msg=f"row {b}")
    offsets.append((int(t), int(l)))
  return offsets


def test_eval_is_the_normalised_center_crop():
  x = np.random.default_rng(3).integers(0, 256, (3, 11, 11, 3), dtype=np.uint8)
  mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
  args = {
    "image_size": 7,
    "mean": mean,
    "std": std,
    "rescale": 1 / 255,
    "random_crop": True,
    "crop_padding": 4,
    "flip": True,
  }
  out = augment.model_input(x, None, train=True, **args)  # no key: eval
  assert out.dtype == np.float32 and out.shape == (3, 7, 7, 3)
  crop = x[:, 2:9, 2:9]  # (11 - 7) // 2
  # HF's rounding: rescale in float64, cast, then float32 arithmetic.
  expected = ((crop.astype(np.float64) / 255).astype(np.float32) - np.float32(mean)) / np.float32(
    std
  )
  np.testing.assert_array_equal(np.asarray(out), expected)
  np.testing.assert_allclose(np.asarray(out), (crop / 255 - mean) / std, atol=1e-6)
  key = jax.random.key(0)
  np.testing.assert_array_equal(augment.model_input(x, key, train=False, **args), out)
  np.testing.assert_array_equal(
    augment.hf_pixel_values(x, images.Preprocess(7, 11, mean=mean, std=std)),
    np.asarray(out).transpose(0, 3, 1, 2),
  )
  # An odd margin rounds the top-left down, as HF's center_crop: (10 - 7) // 2 = 1.
  odd = augment.model_input(x[:, :10, :10], None, train=False, **args)
  np.testing.assert_array_equal(odd, augment.model_input(x[:, 1:8, 1:8], None, train=False, **args))


def test_random_crops_in_bounds_vary_and_replay():
  x = coordinate_images()
  offsets = {}
  model_input = jax.jit(lambda x, key: augment.model_input(x, key, **augment_args()))
  for seed in range(20):
    out = model_input(x, jax.random.key(seed))
    assert out.shape == (B, H, H, 3) and out.dtype == np.float32
    offsets[seed] = crop_offsets(out)
  assert len(set(offsets[0])) > 1  # rows differ
  assert offsets[0] != offsets[1]  # keys differ
  tops = [t for o in offsets.values() for t, _ in o]
  lefts = [l for o in offsets.values() for _, l in o]
  # Offsets cover [0, S + 2 * PAD - H] inclusive, and nothing else (crop_offsets checks).
  assert min(tops) == min(lefts) == 0 and max(tops) == max(lefts) == S + 2 * PAD - H

  key = jax.random.key(7)
  first, again = model_input(x, key), model_input(x, key)
  assert np.asarray(first).tobytes() == np.asarray(again).tobytes()
  # Row b's crop depends on (key, b) only, not on the batch.
  np.testing.assert_array_equal(model_input(x[:5], key), first[:5])
  crop_offsets(model_input(x, jax.random.PRNGKey(7)))  # raw keys work too


def test_flip_flips_some_rows():
  x = coordinate_images()
  center = np.asarray(augment.model_input(x, None, **augment_args()))
  out = np.asarray(
    augment.model_input(x, jax.random.key(0), **augment_args(random_crop=False, flip=True))
  )
  flipped = [b for b in range(B) if np.array_equal(out[b], center[b, :, ::-1])]
  kept = [b for b in range(B) if np.array_equal(out[b], center[b])]
  assert len(flipped) + len(kept) == B and flipped and kept
  # The same key flips the same rows when cropping randomly too (crop and flip keys split).
  both = np.asarray(augment.model_input(x, jax.random.key(0), **augment_args(flip=True)))
  crops = np.asarray(augment.model_input(x, jax.random.key(0), **augment_args()))
  for b in range(B):
    np.testing.assert_array_equal(both[b], crops[b, :, ::-1] if b in flipped else crops[b])


def test_jit_and_eager_agree_bitwise():
  x = np.random.default_rng(4).integers(0, 256, (6, 12, 12, 3), dtype=np.uint8)
  args = augment_args(
    mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), rescale=1 / 255, flip=True
  )
  key = jax.random.key(3)
  eager = augment.model_input(x, key, **args)
  jitted = jax.jit(lambda x, key: augment.model_input(x, key, **args))(x, key)
  assert np.asarray(eager).tobytes() == np.asarray(jitted).tobytes()


# --- The tiny image set -------------------------------------------------------------------


def test_tiny_set_matches_generate_and_loads():
  generated = tiny_images.generate(tiny_images.SEED)
  assert tuple(generated) == tiny_images.CLASS_NAMES
  root = tiny_images.DEFAULT_IMAGES_PATH
  for kind, arrays in generated.items():
    files = sorted((root / kind).iterdir())
    assert [f.name for f in files] == [f"{i:04d}.png" for i in range(tiny_images.PER_CLASS)]
    for f, x in zip(files, arrays):
      np.testing.assert_array_equal(np.asarray(Image.open(f)), x, err_msg=str(f))
  pre = images.Preprocess(image_size=32, stored_size=40, resize="exact")
  ds = images.load_image_dataset(root, pre, num_classes=4)
  assert ds.class_names == tiny_images.CLASS_NAMES
  assert ds.images.shape == (4 * 96, 40, 40, 3)
  assert np.bincount(ds.labels).tolist() == [96] * 4
  np.testing.assert_array_equal(ds.images, np.stack([x for v in generated.values() for x in v]))
  total = sum(f.stat().st_size for f in tiny_images.DEFAULT_IMAGES_DIR.rglob("*"))
  assert total < 1_500_000


def test_tiny_set_is_deterministic_and_the_script_writes_it(tmp_path: Path):
  a, b = tiny_images.generate(5), tiny_images.generate(5)
  assert all(np.array_equal(x, y) for k in a for x, y in zip(a[k], b[k]))
  assert not np.array_equal(a["circle"][0], tiny_images.generate(6)["circle"][0])
  spec = importlib.util.spec_from_file_location("make_tiny_images", SCRIPT)
  script = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(script)
  script.main(["--out", str(tmp_path), "--seed", "5"])
  ds = images.load_class_folders(tmp_path / "train", images.Preprocess(40, 40, resize="exact"))
  np.testing.assert_array_equal(ds.images, np.stack([x for v in a.values() for x in v]))
