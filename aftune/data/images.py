"""Image data for vision fine-tuning: host-side preprocessing and loaders.

  Preprocess                         how an image becomes the model's input (job spec)
  from_hf_preprocessor(path)         a Preprocess from a Hugging Face preprocessor_config.json
  preprocess_image(img, pre)         PIL image -> uint8 [stored, stored, 3]
  load_image_dataset(path, pre, num_classes=C)   class folders or HF parquet -> ImageDataset

The work is split in two. On the host, every image is resized as Hugging Face's image
processors do it (PIL, same filter, same output size) and center-cropped to a square of
`stored_size`; those uint8 arrays are the dataset the job commits to. In the graph
(`aftune.data.augment.model_input`) the stored image is cropped to `image_size` (central, or
random in training), maybe flipped, rescaled and normalised. With (stored_size - image_size)
even, the two center crops in a row equal HF's single one, so the eval input is HF's
`pixel_values` (up to float rounding, see augment.hf_pixel_values).

Every problem with an input file raises `errors.InputError` whose message starts with the
file (and row, for parquet); a Preprocess that cannot work raises `errors.ConfigError`.
The loaders only read.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import warnings
from collections.abc import Iterator
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from PIL import ImageFile

from aftune import errors

RESIZE_MODES = ("shortest_edge", "exact")
RESAMPLE = {
  "nearest": Image.Resampling.NEAREST,
  "bilinear": Image.Resampling.BILINEAR,
  "bicubic": Image.Resampling.BICUBIC,
  "lanczos": Image.Resampling.LANCZOS,
}
# Hugging Face stores PIL's enum values (PILImageResampling) in preprocessor_config.json.
HF_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic"}
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
# Decoders we let PIL use: fewer plugins on untrusted bytes, and what the datasets ship.
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP")
# PIL's default Image.MAX_IMAGE_PIXELS; enforced even if someone set PIL's to None.
MAX_IMAGE_PIXELS = 1024 * 1024 * 1024 // 4 // 3


@dataclasses.dataclass(frozen=True)
class Preprocess:
  """How images become the model's input; bound into the job spec (to_dict).

  Attributes:
    image_size: The model's square input size (after the in-graph crop).
    stored_size: Images are stored square at this size after host preprocessing
      (>= image_size; the margin is room for the in-graph crop).
    resize: "shortest_edge": the shorter side goes to resize_size (aspect kept, as HF's
      get_resize_output_image_size(default_to_square=False)), then a center crop of
      stored_size x stored_size; "exact": straight to stored_size x stored_size.
    resize_size: The shortest_edge target; 0 means stored_size.
    resample: The PIL filter: bilinear | bicubic | nearest | lanczos.
    mean: Per-channel mean subtracted after rescaling (RGB).
    std: Per-channel std divided by after that.
    rescale: Factor from uint8 to the range mean/std refer to (HF's rescale_factor).
  """

  image_size: int
  stored_size: int
  resize: str = "shortest_edge"
  resize_size: int = 0
  resample: str = "bilinear"
  mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
  std: tuple[float, float, float] = (0.5, 0.5, 0.5)
  rescale: float = 1 / 255

  @property
  def resize_target(self) -> int:
    """The shortest_edge target in pixels (resize_size, or stored_size when 0)."""
    return self.resize_size or self.stored_size

  def to_dict(self) -> dict[str, Any]:
    """A JSON-able dict (tuples as lists); from_dict inverts it."""
    d = dataclasses.asdict(self)
    d["mean"], d["std"] = list(self.mean), list(self.std)
    return d

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> Preprocess:
    """Inverts to_dict; unknown or missing keys raise ConfigError."""
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(d) - set(names))
    if unknown:
      raise errors.ConfigError(f"preprocess: unknown field(s) {unknown}; expected {names}")
    missing = [n for n in ("image_size", "stored_size") if n not in d]
    if missing:
      raise errors.ConfigError(f"preprocess: missing field(s) {missing}")
    d = dict(d)
    for name in ("mean", "std"):
      if name in d:
        d[name] = tuple(d[name])
    return cls(**d)

  def validate(self) -> None:
    """Raises errors.ConfigError if these settings cannot preprocess an image."""

    def fail(problem: str) -> errors.ConfigError:
      return errors.ConfigError(f"preprocess: {problem}")

    for name in ("image_size", "stored_size", "resize_size"):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool):
        raise fail(f"{name} must be an int, got {value!r}")
    if self.image_size < 1:
      raise fail(f"image_size must be >= 1, got {self.image_size}")
    if self.stored_size < self.image_size:
      raise fail(
        f"stored_size ({self.stored_size}) must be >= image_size ({self.image_size}): the "
        "model's input is cropped from the stored image"
      )
    if (self.stored_size - self.image_size) % 2:
      raise fail(
        f"stored_size - image_size = {self.stored_size - self.image_size} is odd: the "
        "center crop of the stored center crop would then sit half a pixel off Hugging "
        "Face's one-shot center crop; make the difference even"
      )
    if self.resize not in RESIZE_MODES:
      raise fail(f"unknown resize {self.resize!r}; expected one of {list(RESIZE_MODES)}")
    if self.resize_size < 0:
      raise fail(f"resize_size must be >= 0, got {self.resize_size}")
    if self.resize == "exact" and self.resize_size:
      raise fail(
        f"resize_size ({self.resize_size}) is only used with resize='shortest_edge'; "
        "'exact' resizes straight to stored_size, so leave it 0"
      )
    if self.resize == "shortest_edge" and self.resize_target < self.stored_size:
      raise fail(
        f"resize_size ({self.resize_size}) < stored_size ({self.stored_size}): the center "
        "crop of the resized image would need padding"
      )
    if self.resample not in RESAMPLE:
      raise fail(f"unknown resample {self.resample!r}; expected one of {list(RESAMPLE)}")
    for name in ("mean", "std"):
      value = getattr(self, name)
      if (
        not isinstance(value, (tuple, list))
        or len(value) != 3
        or not all(_is_finite_number(v) for v in value)
      ):
        raise fail(f"{name} must be 3 finite numbers (RGB), got {value!r}")
    if any(s == 0 for s in self.std):
      raise fail(f"std has a zero entry {self.std!r}: normalising would divide by zero")
    if not _is_finite_number(self.rescale) or self.rescale <= 0:
      raise fail(f"rescale must be a finite number > 0, got {self.rescale!r}")


def _is_finite_number(v: Any) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# --- Hugging Face preprocessor_config.json -------------------------------------------------

# The processors we support: class defaults for the fields a config may leave out (as HF
# fills them in) and whether an int `size` means a square (HF's default_to_square).
_HF_PROCESSORS = {
  "ViTImageProcessor": {"resample": 2, "square": True},
  "BitImageProcessor": {"resample": 3, "square": False},
  "ConvNextImageProcessor": {"resample": 3, "square": False},
}
# Old configs name a feature extractor; the fast/PIL backends save the plain name, but
# accept their suffixed names too.
_HF_ALIASES = {
  "ViTFeatureExtractor": "ViTImageProcessor",
  "ConvNextFeatureExtractor": "ConvNextImageProcessor",
}


def from_hf_preprocessor(
  path: str | Path, *, image_size: int | None = None, stored_size: int | None = None
) -> Preprocess:
  """Reads a Hugging Face preprocessor_config.json into the equivalent Preprocess.

  Supported (transformers 5.x semantics, PIL backend):
    ViTImageProcessor: size {"height", "width"} (square): resize="exact" to it.
    BitImageProcessor (DINOv2): size {"shortest_edge": r}, do_center_crop with crop_size
      c: resize="shortest_edge", resize_size=r, image_size=c.
    ConvNextImageProcessor (ResNet): size {"shortest_edge": e}; e < 384: the shortest edge
      goes to int(e / crop_pct), then a center crop of e (resize_size=int(e / crop_pct),
      image_size=e); e >= 384: warped to e x e (resize="exact").
  image_mean, image_std, rescale_factor, resample come from the file (do_rescale /
  do_normalize false: rescale 1, mean 0, std 1). stored_size defaults to the largest size
  <= resize_size with (stored_size - image_size) even, so the eval input equals HF's.

  Args:
    path: The preprocessor_config.json, or a directory containing it.
    image_size: Fine-tune at this resolution instead: the resize target scales with it
      (ConvNeXt: as HF would with size {"shortest_edge": image_size}).
    stored_size: Store at this size instead of the default (e.g. more room for random
      crops; with "exact" the eval input then differs from HF's).

  Returns:
    The validated Preprocess.

  Raises:
    errors.InputError: unreadable file, unsupported processor or settings, missing fields.
    errors.ConfigError: the overrides give an invalid Preprocess.
  """
  path = Path(path)
  if path.is_dir():
    path = path / "preprocessor_config.json"
  try:
    cfg = json.loads(path.read_text(encoding="utf-8"))
  except FileNotFoundError:
    raise errors.InputError(f"{path}: file not found") from None
  except (OSError, UnicodeDecodeError) as e:
    raise errors.InputError(f"{path}: cannot read file: {e}") from None
  except json.JSONDecodeError as e:
    raise errors.InputError(f"{path}: invalid JSON: {e.msg} (line {e.lineno})") from None
  if not isinstance(cfg, dict):
    raise errors.InputError(f"{path}: expected a JSON object, got {type(cfg).__name__}")

  def fail(problem: str) -> errors.InputError:
    return errors.InputError(f"{path}: {problem}")

  kind = cfg.get("image_processor_type") or cfg.get("feature_extractor_type")
  if kind is None:
    raise fail("missing field 'image_processor_type'")
  name = _HF_ALIASES.get(kind, kind)
  for suffix in ("Fast", "Pil"):
    if name.endswith(suffix) and name[: -len(suffix)] in _HF_PROCESSORS:
      name = name[: -len(suffix)]
  if name not in _HF_PROCESSORS:
    raise fail(f"unsupported image processor {kind!r}; supported: {list(_HF_PROCESSORS)}")
  defaults = _HF_PROCESSORS[name]

  for field in ("size", "image_mean", "image_std"):
    if field not in cfg:
      raise fail(f"missing field '{field}'")
  if not cfg.get("do_resize", True):
    raise fail("do_resize is false: images of different sizes cannot be batched")
  resample_id = cfg.get("resample", defaults["resample"])
  if resample_id not in HF_RESAMPLE:
    raise fail(
      f"unsupported resample {resample_id!r}; supported: "
      + ", ".join(f"{k} ({v})" for k, v in HF_RESAMPLE.items())
    )
  size = _hf_size(cfg["size"], defaults["square"], "size", fail)
  do_crop = bool(cfg.get("do_center_crop"))
  crop = None
  if do_crop:
    if "crop_size" not in cfg:
      raise fail("do_center_crop is true but field 'crop_size' is missing")
    crop = _hf_size(cfg["crop_size"], True, "crop_size", fail)["height"]

  # The processor's resize as (mode, resize target, final crop): HF's pipeline is resize,
  # then (optionally) center crop.
  if name == "ViTImageProcessor" or (name == "BitImageProcessor" and "height" in size):
    if "height" not in size:
      raise fail(f"size {cfg['size']!r}: expected {{'height', 'width'}}")
    mode, target, final = "exact", size["height"], size["height"]
    if do_crop and crop != target:
      raise fail(
        f"do_center_crop with crop_size {crop} after an exact resize to {target} is not supported"
      )
  elif name == "BitImageProcessor":
    mode, target = "shortest_edge", size["shortest_edge"]
    final = crop if do_crop else None
    if final is None:
      raise fail("size 'shortest_edge' without do_center_crop gives non-square images")
  else:  # ConvNext
    if "shortest_edge" not in size:
      raise fail(f"size {cfg['size']!r}: ConvNextImageProcessor needs 'shortest_edge'")
    crop_pct = cfg.get("crop_pct", 224 / 256)
    if not _is_finite_number(crop_pct) or not 0 < crop_pct <= 1:
      raise fail(f"crop_pct must be in (0, 1], got {crop_pct!r}")
    edge = size["shortest_edge"]
    if do_crop and crop != edge:
      raise fail(
        f"do_center_crop with crop_size {crop} after ConvNeXt's crop to {edge} is not supported"
      )
    # Another resolution: what HF does with size {"shortest_edge": image_size}.
    mode, target, final = _convnext_resize(edge if image_size is None else image_size, crop_pct)
  if final > target:
    raise fail(f"crop {final} is larger than the resized image ({target}): HF would pad")

  mean, std = (
    _hf_triple(cfg["image_mean"], "image_mean", fail),
    _hf_triple(cfg["image_std"], "image_std", fail),
  )
  if not cfg.get("do_normalize", True):
    mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
  rescale = cfg.get("rescale_factor", 1 / 255)
  if not _is_finite_number(rescale):
    raise fail(f"rescale_factor must be a number, got {rescale!r}")
  if not cfg.get("do_rescale", True):
    rescale = 1.0

  if image_size is not None and name != "ConvNextImageProcessor":
    if mode == "exact":
      target = image_size
    else:  # the resize keeps its ratio to the crop (DINOv2: 256/224)
      target = max(image_size, round(target * image_size / final))
    final = image_size
  if stored_size is None:
    # The largest square inside the resized image whose margin around the final crop is
    # even (so our two center crops equal HF's one).
    stored_size = target if mode == "exact" else target - (target - final) % 2
  pre = Preprocess(
    image_size=final,
    stored_size=stored_size,
    resize=mode,
    resize_size=target if mode == "shortest_edge" else 0,
    resample=HF_RESAMPLE[resample_id],
    mean=mean,
    std=std,
    rescale=float(rescale),
  )
  pre.validate()
  return pre


def _convnext_resize(edge: int, crop_pct: float) -> tuple[str, int, int]:
  """ConvNextImageProcessor.resize as (mode, resize target, crop); from 384 on it warps."""
  if edge < 384:
    return "shortest_edge", int(edge / crop_pct), edge
  return "exact", edge, edge


def _hf_size(value: Any, square: bool, field: str, fail) -> dict[str, int]:
  """HF's get_size_dict for the forms we support: an int or a dict of ints."""
  if isinstance(value, int) and not isinstance(value, bool):
    value = {"height": value, "width": value} if square else {"shortest_edge": value}
  if not isinstance(value, dict) or not all(
    isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value.values()
  ):
    raise fail(f"field '{field}' must be an int or a dict of positive ints, got {value!r}")
  if set(value) == {"height", "width"}:
    if value["height"] != value["width"]:
      raise fail(f"field '{field}' {value!r} is not square; only square inputs are supported")
    return value
  if set(value) == {"shortest_edge"} and not square:
    return value
  raise fail(f"field '{field}' {value!r}: unsupported keys")


def _hf_triple(value: Any, field: str, fail) -> tuple[float, float, float]:
  """HF's mean/std: one number for all channels or one per channel."""
  if _is_finite_number(value):
    value = [value] * 3
  if not isinstance(value, list) or len(value) != 3 or not all(_is_finite_number(v) for v in value):
    raise fail(f"field '{field}' must be 3 numbers (RGB), got {value!r}")
  return tuple(float(v) for v in value)


# --- One image -----------------------------------------------------------------------------


def preprocess_image(img: Image.Image, pre: Preprocess) -> np.ndarray:
  """Resizes and center-crops one image as Hugging Face's PIL-backend processors do.

  Transparency is composited onto white (HF's convert_to_rgb), other modes convert to RGB.
  Resizing is PIL's Image.resize with the given filter (reducing_gap None, as HF), to the
  size HF computes; the crop starts at top = (h - crop) // 2, left = (w - crop) // 2.

  Args:
    img: The decoded image.
    pre: The preprocessing (validated here).

  Returns:
    uint8 [stored_size, stored_size, 3].
  """
  pre.validate()
  img = _to_rgb(img)
  s = pre.stored_size
  if pre.resize == "exact":
    out_h, out_w = s, s
  else:
    out_h, out_w = _shortest_edge_size(img.height, img.width, pre.resize_target)
  # PIL's resize takes (width, height).
  img = img.resize((out_w, out_h), resample=RESAMPLE[pre.resample], reducing_gap=None)
  x_HxWx3 = np.asarray(img, dtype=np.uint8)
  top, left = (out_h - s) // 2, (out_w - s) // 2
  return np.ascontiguousarray(x_HxWx3[top : top + s, left : left + s])


def _shortest_edge_size(height: int, width: int, size: int) -> tuple[int, int]:
  """HF's get_resize_output_image_size(default_to_square=False) -> (height, width)."""
  short, long = (width, height) if width <= height else (height, width)
  new_short, new_long = size, int(size * long / short)
  return (new_long, new_short) if width <= height else (new_short, new_long)


def _to_rgb(img: Image.Image) -> Image.Image:
  if "A" in img.getbands() or img.info.get("transparency") is not None:
    rgba = img.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")
  return img.convert("RGB")


@contextlib.contextmanager
def _strict_pil() -> Iterator[None]:
  """Truncated files fail and oversized ones raise, whatever PIL's globals say."""
  saved = ImageFile.LOAD_TRUNCATED_IMAGES
  ImageFile.LOAD_TRUNCATED_IMAGES = False
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("error", Image.DecompressionBombWarning)
      yield
  finally:
    ImageFile.LOAD_TRUNCATED_IMAGES = saved


def decode_image(data: bytes, source: str) -> Image.Image:
  """Decodes (fully) one PNG/JPEG/WEBP image; any problem is an InputError naming source."""
  with _strict_pil():
    try:
      img = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
      limit = Image.MAX_IMAGE_PIXELS or MAX_IMAGE_PIXELS
      if img.width * img.height > limit:
        raise Image.DecompressionBombError(
          f"{img.width}x{img.height} = {img.width * img.height} pixels exceeds the limit of {limit}"
        )
      img.load()  # decode now: a truncated file fails here, not later in a resize
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
      raise errors.InputError(f"{source}: image too large (decompression bomb?): {e}") from None
    except Image.UnidentifiedImageError:
      raise errors.InputError(
        f"{source}: not a readable image (not a {'/'.join(IMAGE_FORMATS)} file)"
      ) from None
    except Exception as e:  # noqa: BLE001 -- decoders raise many types on hostile bytes
      raise errors.InputError(f"{source}: not a readable image ({e})") from None
  return img


# --- Datasets ------------------------------------------------------------------------------


@dataclasses.dataclass
class ImageDataset:
  """Preprocessed images with their labels.

  Attributes:
    images: uint8 [N, S, S, 3], S = Preprocess.stored_size.
    labels: int32 [N].
    class_names: The class of each label value (index = label).
    sources: Per example, the file (or "<parquet file> row <i>") it came from.
  """

  images: np.ndarray
  labels: np.ndarray
  class_names: tuple[str, ...]
  sources: tuple[str, ...]

  def __len__(self) -> int:
    return len(self.labels)


def _check_num_samples(num_samples: int, available: int, where: Path) -> int:
  """The number of examples to load (num_samples, or all when 0)."""
  if num_samples < 0:
    raise errors.ConfigError(f"num_samples must be >= 0, got {num_samples}")
  if num_samples > available:
    raise errors.ConfigError(
      f"num_samples = {num_samples} but {where} has only {available} examples"
    )
  return num_samples or available


def _visible(path: Path) -> bool:
  return not path.name.startswith(".")


def load_class_folders(root: str | Path, pre: Preprocess, *, num_samples: int = 0) -> ImageDataset:
  """Loads root/<class>/<image> (torchvision ImageFolder layout).

  Classes are the sorted folder names, labelled 0..C-1; files are sorted by name within a
  class and the examples ordered class by class. Images end in .png, .jpg or .jpeg (any
  case); names starting with "." are ignored; anything else is an error, never skipped.

  Args:
    root: The directory holding one folder per class.
    pre: How to preprocess each image.
    num_samples: Load only the first this many examples (in the order above); 0: all.

  Returns:
    The ImageDataset.

  Raises:
    errors.InputError: missing root, no class folders, an empty class, a file that is not
      an image in a class folder, or an unreadable image.
    errors.ConfigError: num_samples exceeds the examples available.
  """
  root = Path(root)
  pre.validate()
  if not root.is_dir():
    raise errors.InputError(f"{root}: not a directory of class folders")
  class_dirs = []
  for entry in sorted(root.iterdir(), key=lambda p: p.name):
    if not _visible(entry):
      continue
    if not entry.is_dir():
      raise errors.InputError(f"{entry}: not a class folder (expected {root}/<class>/<image>)")
    class_dirs.append(entry)
  if not class_dirs:
    raise errors.InputError(f"{root}: no class folders (expected {root}/<class>/<image>)")
  files, labels = [], []
  for label, class_dir in enumerate(class_dirs):
    found = []
    for entry in sorted(class_dir.iterdir(), key=lambda p: p.name):
      if not _visible(entry):
        continue
      if entry.is_dir() or entry.suffix.lower() not in IMAGE_EXTENSIONS:
        raise errors.InputError(
          f"{entry}: not an image file (class folders hold only {'/'.join(IMAGE_EXTENSIONS)} files)"
        )
      found.append(entry)
    if not found:
      raise errors.InputError(f"{class_dir}: empty class folder (no images)")
    files += found
    labels += [label] * len(found)
  n = _check_num_samples(num_samples, len(files), root)
  images_NxSxSx3 = np.empty((n, pre.stored_size, pre.stored_size, 3), np.uint8)
  for i, path in enumerate(files[:n]):
    try:
      data = path.read_bytes()
    except OSError as e:
      raise errors.InputError(f"{path}: cannot read file: {e}") from None
    images_NxSxSx3[i] = preprocess_image(decode_image(data, str(path)), pre)
  return ImageDataset(
    images=images_NxSxSx3,
    labels=np.asarray(labels[:n], np.int32),
    class_names=tuple(d.name for d in class_dirs),
    sources=tuple(str(p) for p in files[:n]),
  )


def _parquet_files(path: Path) -> list[Path]:
  """The .parquet file, or every visible *.parquet under the directory (sorted)."""
  if path.is_file():
    return [path]
  found = [
    p
    for p in path.rglob("*.parquet")
    if p.is_file() and all(_visible(Path(part)) for part in p.relative_to(path).parts)
  ]
  return sorted(found, key=lambda p: p.relative_to(path).as_posix())


def load_parquet(path: str | Path, pre: Preprocess, *, num_samples: int = 0) -> ImageDataset:
  """Loads Hugging Face's image parquet layout (as `timm/mini-imagenet` ships it).

  Columns: `image` (struct {bytes: binary, path: string}; the bytes must be embedded) and
  `label` (integer). Files are read one row group at a time.

  Args:
    path: A .parquet file, or a directory: all *.parquet under it, sorted by relative path
      (paths with a hidden component, like .cache/, are skipped).
    pre: How to preprocess each image.
    num_samples: Load only the first this many rows (file by file); 0: all.

  Returns:
    The ImageDataset; class_names are "0".."C-1", C = the largest label + 1 over all rows.

  Raises:
    errors.InputError: no parquet files, an unreadable file, a missing or mistyped column,
      a null or negative label, missing image bytes, an unreadable image.
    errors.ConfigError: num_samples exceeds the rows available.
  """
  import pyarrow as pa  # here: only parquet datasets need pyarrow
  import pyarrow.parquet as pq

  path = Path(path)
  pre.validate()
  if not path.exists():
    raise errors.InputError(f"{path}: not found")
  files = _parquet_files(path)
  if not files:
    raise errors.InputError(f"{path}: no .parquet files")
  opened = []
  max_label = -1
  for file in files:
    try:
      pf = pq.ParquetFile(file)
    except (OSError, pa.ArrowException) as e:
      raise errors.InputError(f"{file}: not a readable parquet file ({e})") from None
    schema = pf.schema_arrow
    _check_parquet_schema(schema, file, pa)
    # The labels alone are small: read them all up front for the class count.
    labels = pf.read(columns=["label"]).column("label")
    if labels.null_count:
      row = next(i for i, v in enumerate(labels.is_null().to_pylist()) if v)
      raise errors.InputError(f"{file} row {row}: label is null")
    labels_np = labels.to_numpy()
    if len(labels_np) and labels_np.min() < 0:
      row = int(np.argmax(labels_np < 0))
      raise errors.InputError(f"{file} row {row}: negative label {int(labels_np[row])}")
    if len(labels_np):
      max_label = max(max_label, int(labels_np.max()))
    opened.append((file, pf))
  available = sum(pf.metadata.num_rows for _, pf in opened)
  n = _check_num_samples(num_samples, available, path)
  images_NxSxSx3 = np.empty((n, pre.stored_size, pre.stored_size, 3), np.uint8)
  labels_N = np.empty((n,), np.int32)
  sources = []
  i = 0
  for file, pf in opened:
    row = 0
    for g in range(pf.num_row_groups):
      if i == n:
        break
      try:
        table = pf.read_row_group(g, columns=["image", "label"])
      except (OSError, pa.ArrowException) as e:
        raise errors.InputError(f"{file}: cannot read row group {g} ({e})") from None
      images = table.column("image")
      labels = table.column("label").to_numpy()
      for j in range(min(len(table), n - i)):
        source = f"{file} row {row + j}"
        value = images[j].as_py()  # {"bytes": ..., "path": ...} or None
        data = value.get("bytes") if value else None
        if data is None:
          raise errors.InputError(f"{source}: image has no embedded bytes")
        images_NxSxSx3[i] = preprocess_image(decode_image(data, source), pre)
        labels_N[i] = labels[j]
        sources.append(source)
        i += 1
      row += len(table)
  return ImageDataset(
    images=images_NxSxSx3,
    labels=labels_N,
    class_names=tuple(str(c) for c in range(max_label + 1)),
    sources=tuple(sources),
  )


def _check_parquet_schema(schema, file: Path, pa) -> None:
  """Raises InputError unless image is struct{bytes: binary, ...} and label an integer."""
  names = schema.names
  for column in ("image", "label"):
    if column not in names:
      raise errors.InputError(f"{file}: missing column '{column}' (columns: {names})")
  image_type = schema.field("image").type
  if not (
    pa.types.is_struct(image_type)
    and image_type.get_field_index("bytes") >= 0
    and (
      pa.types.is_binary(image_type.field("bytes").type)
      or pa.types.is_large_binary(image_type.field("bytes").type)
    )
  ):
    raise errors.InputError(
      f"{file}: column 'image' must be a struct with a binary 'bytes' field, got {image_type}"
    )
  label_type = schema.field("label").type
  if not pa.types.is_integer(label_type):
    raise errors.InputError(f"{file}: column 'label' must be an integer, got {label_type}")


def load_image_dataset(
  path: str | Path, pre: Preprocess, *, num_classes: int, num_samples: int = 0
) -> ImageDataset:
  """Loads class folders or parquet and checks the labels fit the classifier head.

  Args:
    path: A .parquet file, a directory with *.parquet under it, or a directory of class
      folders.
    pre: How to preprocess each image.
    num_classes: The head's size; every label must be in [0, num_classes).
    num_samples: Load only the first this many examples; 0: all.

  Returns:
    The ImageDataset.

  Raises:
    errors.InputError: see load_parquet / load_class_folders; a label outside the head.
    errors.ConfigError: num_samples exceeds the examples available.
  """
  path = Path(path)
  if not path.exists():
    raise errors.InputError(f"{path}: not found")
  if path.is_file():
    if path.suffix.lower() != ".parquet":
      raise errors.InputError(
        f"{path}: expected a .parquet file or a directory (class folders or parquet)"
      )
    ds = load_parquet(path, pre, num_samples=num_samples)
  elif _parquet_files(path):
    ds = load_parquet(path, pre, num_samples=num_samples)
  else:
    ds = load_class_folders(path, pre, num_samples=num_samples)
  bad = np.flatnonzero((ds.labels < 0) | (ds.labels >= num_classes))
  if bad.size:
    k = int(bad[0])
    raise errors.InputError(
      f"{ds.sources[k]}: label {int(ds.labels[k])} is outside the classifier head's "
      f"{num_classes} classes [0, {num_classes}); the dataset has {len(ds.class_names)} "
      "classes"
    )
  return ds
