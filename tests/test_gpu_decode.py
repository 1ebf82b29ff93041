"""GPU JPEG decoding: the parts that need no GPU (batches and order, resize/crop/normalise vs PIL, errors)."""

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.data.gpu_decode import assemble, check_decoder, eval_geometry, jpeg_batches
from pipeline.data.shards import read_manifest
from pipeline.features.cache import encode_shards


def test_batches_come_in_manifest_order_across_shards(digits_shards):
    keys = read_manifest(digits_shards["mnist"])["keys"]
    batches = list(jpeg_batches(digits_shards["mnist"], 16))  # 60 images in shards of 25: batches span shards
    assert [len(k) for k, _ in batches] == [16, 16, 16, 12]
    assert [k for b, _ in batches for k in b] == keys
    assert all(raw[:2] == b"\xff\xd8" for _, data in batches for raw in data)  # JPEG start-of-image


@pytest.mark.parametrize("shape", [(300, 420), (512, 333), (224, 224)])
def test_resize_crop_normalise_matches_the_pil_eval_transform(shape):
    import open_clip

    preprocess = open_clip.image_transform(224, is_train=False)
    cfg = {"size": 224, "mean": open_clip.OPENAI_DATASET_MEAN, "std": open_clip.OPENAI_DATASET_STD,
           "interpolation": "bicubic", "resize_mode": "shortest"}
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]].astype(np.float32)
    pixels = np.stack([xx / shape[1] * 255, yy / shape[0] * 255, 128 + 60 * np.sin(xx / 9)], -1)
    pixels = np.clip(pixels + rng.normal(0, 4, pixels.shape), 0, 255).astype(np.uint8)
    pil = Image.fromarray(pixels)
    expected = preprocess(pil)
    size, mean, std = eval_geometry(cfg)
    got = assemble([torch.from_numpy(pixels).permute(2, 0, 1)], size=size, mean=mean, std=std)[0]
    assert got.shape == expected.shape
    # tensor bicubic vs PIL bicubic: same geometry, small rounding differences (units: normalised pixels)
    diff = (got - expected).abs()
    assert diff.mean() < 0.02 and diff.max() < 0.25


def test_gpu_decode_is_refused_without_cuda_and_unknown_decoders(digits_shards):
    with pytest.raises(ValueError, match="needs a CUDA device"):
        check_decoder("gpu", "cpu")
    with pytest.raises(ValueError, match="not one of"):
        check_decoder("nvjpeg", "cuda")
    with pytest.raises(ValueError, match="needs a CUDA device"):
        encode_shards(lambda x: x, digits_shards["mnist"], transform=None, batch_size=8, device="cpu",
                      precision="fp32", decode="gpu", preprocess={"size": 32})
    with pytest.raises(ValueError, match="bicubic"):
        eval_geometry({"size": 224, "mean": (0, 0, 0), "std": (1, 1, 1), "interpolation": "bilinear"})


def test_encode_images_passes_the_decoder_through(digits_shards):
    from pipeline.features.cache import encode_images
    from pipeline.models.factory import ModelSpec, load_model

    model = load_model(ModelSpec(name="digits-vit-teacher", pretrained="random"))
    keys, _ = encode_images(model, digits_shards["mnist"], batch_size=16, device="cpu", decode="cpu")
    assert keys == read_manifest(digits_shards["mnist"])["keys"]
    with pytest.raises(ValueError, match="needs a CUDA device"):
        encode_images(model, digits_shards["mnist"], batch_size=16, device="cpu", decode="gpu")


def test_png_members_are_decoded_beside_the_jpegs_in_order(monkeypatch):
    # torchvision's image extension does not load beside this machine's torch, so the two decoders are
    # stood in by PIL; what is checked is the routing: JPEGs in one batched call, PNGs apart, order kept.
    import io

    import torchvision.io

    from pipeline.data.gpu_decode import decode_jpegs

    def pil(t):
        return torch.from_numpy(np.array(Image.open(io.BytesIO(t.numpy().tobytes())).convert("RGB"))).permute(2, 0, 1)

    calls = []
    monkeypatch.setattr(torchvision.io, "decode_jpeg",
                        lambda batch, mode, device: calls.append(("jpeg", len(batch))) or [pil(t) for t in batch])
    monkeypatch.setattr(torchvision.io, "decode_image",
                        lambda t, mode: calls.append(("other", 1)) or pil(t))
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 255, (h, w, 3), dtype=np.uint8) for h, w in [(20, 30), (25, 17), (12, 40)]]
    data = []
    for i, pixels in enumerate(images):
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="PNG" if i == 1 else "JPEG", quality=95)
        data.append(buf.getvalue())
    out = decode_jpegs(data, "cpu")
    assert calls == [("jpeg", 2), ("other", 1)]
    assert [tuple(t.shape) for t in out] == [(3, 20, 30), (3, 25, 17), (3, 12, 40)]
    assert torch.equal(out[1], torch.from_numpy(images[1]).permute(2, 0, 1))  # the PNG, lossless, in place
