"""The transformers models of ``diffusers_customcontrast.prepare`` on tiny random configs (no weights, no network).

OWL-ViT through the ``zero-shot-object-detection`` pipeline, SAM (``SamModel`` + ``SamProcessor``), BLIP through
``AutoModelForImageTextToText`` and a SegFormer through ``image-segmentation``: each wrapper is checked against the
model called directly, and the command line runs end to end on the models saved as local folders.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from diffusers_customcontrast.data import load_subject_folder
from diffusers_customcontrast.prepare import (
    Detection,
    DetectSegmentMasker,
    ImageTextCaptioner,
    LabelSegmentationMasker,
    SamSegmenter,
    ZeroShotDetector,
    names_class,
)
from diffusers_customcontrast.prepare.cli import main
from diffusers_customcontrast.prepare.detection import _best
from diffusers_customcontrast.testing.tiny_models import tiny_clip_tokenizer

transformers = pytest.importorskip("transformers")


def image(seed: int, size: tuple[int, int] = (64, 48)) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def processor_class(name: str):
    """transformers' PIL image processor (the default one needs torchvision, which the test environment lacks)."""
    return getattr(transformers, f"{name}Pil", None) or getattr(transformers, name)


@pytest.fixture(scope="module")
def owl():
    # OWL-ViT masks the queries whose first token id is 0, so the vocabulary starts with a padding token.
    byte_level = tiny_clip_tokenizer()
    vocab = {"<pad>": 0, **{token: i + 1 for token, i in byte_level.get_vocab().items()}}
    tokenizer = transformers.CLIPTokenizer(vocab=vocab, merges=[], pad_token="<pad>", model_max_length=16)
    common = {"hidden_size": 16, "intermediate_size": 32, "num_attention_heads": 2, "num_hidden_layers": 1}
    config = transformers.OwlViTConfig(
        text_config={**common, "vocab_size": len(vocab), "max_position_embeddings": 16, "bos_token_id": 1,
                     "eos_token_id": 2, "pad_token_id": 0},
        vision_config={**common, "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.OwlViTForObjectDetection(config).eval()
    with torch.no_grad():  # random heads give scores of 0 or 1; these give a detection in every image
        model.class_head.logit_shift.bias.fill_(3.0)
        model.class_head.logit_scale.weight.zero_()
    image_processor = processor_class("OwlViTImageProcessor")(
        size={"height": 32, "width": 32}, crop_size={"height": 32, "width": 32}
    )
    return transformers.OwlViTProcessor(image_processor=image_processor, tokenizer=tokenizer), model


@pytest.fixture(scope="module")
def sam():
    config = transformers.SamConfig(
        vision_config=transformers.SamVisionConfig(
            hidden_size=16, num_hidden_layers=1, num_attention_heads=2, image_size=64, patch_size=16,
            output_channels=8, intermediate_size=16, mlp_dim=16, global_attn_indexes=[0], window_size=0,
            num_pos_feats=4,
        ),
        prompt_encoder_config=transformers.SamPromptEncoderConfig(
            hidden_size=8, image_size=64, patch_size=16, mask_input_channels=4
        ),
        mask_decoder_config=transformers.SamMaskDecoderConfig(
            hidden_size=8, mlp_dim=16, num_hidden_layers=1, num_attention_heads=2, iou_head_hidden_dim=8
        ),
    )  # fmt: skip
    torch.manual_seed(0)
    image_processor = processor_class("SamImageProcessor")(
        size={"longest_edge": 64}, pad_size={"height": 64, "width": 64},
        mask_size={"longest_edge": 16}, mask_pad_size={"height": 16, "width": 16},
    )  # fmt: skip
    return transformers.SamProcessor(image_processor), transformers.SamModel(config).eval()


@pytest.fixture(scope="module")
def blip(tmp_path_factory):
    vocab_file = tmp_path_factory.mktemp("blip_vocab") / "vocab.txt"
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "toy", "photo", "of", "on", "red", "table"]
    vocab_file.write_text("\n".join(words + [chr(c) for c in range(ord("a"), ord("z") + 1)]))
    tokenizer = transformers.BertTokenizer(str(vocab_file))
    common = {"hidden_size": 16, "intermediate_size": 32, "num_attention_heads": 2, "num_hidden_layers": 1}
    config = transformers.BlipConfig(
        text_config={**common, "vocab_size": tokenizer.vocab_size, "encoder_hidden_size": 16,
                     "max_position_embeddings": 32, "bos_token_id": 2, "sep_token_id": 3, "eos_token_id": 3,
                     "pad_token_id": 0},
        vision_config={**common, "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )  # fmt: skip
    torch.manual_seed(0)
    image_processor = processor_class("BlipImageProcessor")(size={"height": 32, "width": 32})
    processor = transformers.BlipProcessor(image_processor=image_processor, tokenizer=tokenizer)
    return processor, transformers.BlipForConditionalGeneration(config).eval()


def test_the_best_box_is_clipped_to_the_image_and_degenerate_boxes_are_skipped():
    found = [
        {"score": 0.9, "box": {"xmin": 10, "ymin": 5, "xmax": 10, "ymax": 30}},  # no width
        {"score": 0.6, "box": {"xmin": -8, "ymin": 4, "xmax": 30, "ymax": 90}},
        {"score": 0.4, "box": {"xmin": 1, "ymin": 1, "xmax": 20, "ymax": 20}},
    ]
    assert _best(found, (64, 48)) == Detection((0.0, 4.0, 30.0, 48.0), 0.6)
    assert _best(found[:1], (64, 48)) is None


def test_zero_shot_detector_takes_the_pipelines_best_box(owl):
    processor, model = owl
    pipeline = transformers.pipeline(
        "zero-shot-object-detection",
        model=model,
        tokenizer=processor.tokenizer,
        image_processor=processor.image_processor,
    )
    images = [image(0), image(1)]
    detections = ZeroShotDetector(pipeline, threshold=0.5)(images, "a photo of a toy")
    for picture, detection in zip(images, detections):
        direct = pipeline(picture, candidate_labels=["a photo of a toy"], threshold=0.5)
        assert detection is not None and detection == _best(direct, picture.size)
        xmin, ymin, xmax, ymax = detection.box
        assert 0 <= xmin < xmax <= picture.width and 0 <= ymin < ymax <= picture.height


def test_sam_segmenter_matches_sam_called_on_each_image(sam):
    processor, model = sam
    images, boxes = [image(0), image(1, (40, 56))], [(4.0, 4.0, 40.0, 30.0), (0.0, 10.0, 30.0, 50.0)]
    masks = SamSegmenter(model, processor)(images, boxes)
    for picture, box, mask in zip(images, boxes, masks):
        inputs = processor(images=picture, input_boxes=[[list(box)]], return_tensors="pt")
        with torch.no_grad():
            logits = model(
                pixel_values=inputs["pixel_values"], input_boxes=inputs["input_boxes"], multimask_output=False
            )
        expected = processor.image_processor.post_process_masks(
            logits.pred_masks, inputs["original_sizes"], inputs["reshaped_input_sizes"]
        )[0][0, 0].numpy()
        assert mask.shape == (picture.height, picture.width) and np.array_equal(mask, expected)


def test_captioner_matches_greedy_generation(blip):
    processor, model = blip
    images = [image(0), image(1)]
    captions = ImageTextCaptioner(model, processor, max_new_tokens=6)(images, "toy")
    with torch.no_grad():
        ids = model.generate(**processor(images=images, return_tensors="pt"), max_new_tokens=6, do_sample=False)
    assert captions == [text.strip() for text in processor.batch_decode(ids, skip_special_tokens=True)]


def test_label_segmentation_masker_takes_the_segments_of_its_labels():
    config = transformers.SegformerConfig(
        num_encoder_blocks=1, depths=[1], sr_ratios=[1], hidden_sizes=[8], patch_sizes=[7], strides=[4],
        num_attention_heads=[1], mlp_ratios=[2], decoder_hidden_size=8, num_labels=2,
        id2label={0: "background", 1: "person"}, label2id={"background": 0, "person": 1},
    )  # fmt: skip
    torch.manual_seed(0)
    pipeline = transformers.pipeline(
        "image-segmentation",
        model=transformers.SegformerForSemanticSegmentation(config).eval(),
        image_processor=processor_class("SegformerImageProcessor")(size={"height": 32, "width": 32}),
    )
    picture = image(0)
    (result,) = LabelSegmentationMasker(pipeline)([picture], "person")
    person = next(s for s in pipeline(picture) if s["label"] == "person")
    assert np.array_equal(result.mask, np.asarray(person["mask"]) > 127)


def test_the_command_line_runs_the_models_from_folders(owl, sam, blip, tmp_path):
    for name, (processor, model) in {"owl": owl, "sam": sam, "blip": blip}.items():
        model.save_pretrained(tmp_path / name)
        processor.save_pretrained(tmp_path / name)
    photos = tmp_path / "photos"
    photos.mkdir()
    for seed in range(3):
        image(seed).save(photos / f"{seed}.png")
    output = tmp_path / "out"
    summary = main(
        ["--input", str(photos), "--output", str(output), "--class_name", "toy", "--detector", str(tmp_path / "owl"),
         "--segmenter", str(tmp_path / "sam"), "--captioner", str(tmp_path / "blip"), "--max_caption_tokens", "6",
         "--detection_threshold", "0.5", "--min_frames", "1", "--min_mask_area", "0", "--max_mask_area", "1",
         "--max_border_touch", "none", "--min_sharpness", "0", "--device", "cpu", "--no_progress"]
    )  # fmt: skip
    assert summary.frames_read == 3 and summary.subjects_kept == 1
    assert summary.frames_kept + sum(summary.frame_drops.values()) == 3
    index = load_subject_folder(output)
    assert len(index["photos"]) == summary.frames_kept
    assert all(frame.has_mask and names_class(frame.caption, "toy") for frame in index["photos"])
    record = json.loads((output / ".prepare" / "records" / "photos.json").read_text())
    assert all(0.5 < frame["score"] <= 1 for frame in record["frames"])  # the detector's scores


def test_detect_segment_masker_passes_the_box_to_the_segmenter():
    class Boxes:
        def __call__(self, images, prompt):
            assert prompt == "a photo of a toy"
            return [Detection((2.0, 2.0, 6.0, 6.0), 0.7), None]

    class BoxSegmenter:
        def __call__(self, images, boxes):
            masks = []
            for picture, (x0, y0, x1, y1) in zip(images, boxes):
                mask = np.zeros((picture.height, picture.width), dtype=bool)
                mask[int(y0) : int(y1), int(x0) : int(x1)] = True
                masks.append(mask)
            return masks

    first, second = DetectSegmentMasker(Boxes(), BoxSegmenter())([image(0, (8, 8)), image(1, (8, 8))], "toy")
    assert second is None and first.score == 0.7 and first.mask.sum() == 16 and first.mask[2:6, 2:6].all()
