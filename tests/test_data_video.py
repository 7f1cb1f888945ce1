"""Video data: exact frame indices of the clip samplers (tiny lossless videos made with PyAV, the
frame index drawn into the pixels), test views, corrupt files, list formats, the train sampler."""

import logging
import os

import numpy as np
import pytest
import torch

from mvit.data.samplers import TrainSampler, clip_frame_indices, segment_frame_indices, shard_indices
from mvit.data.synthetic import MEAN, STD

av = pytest.importorskip("av")
from mvit.data.video import (ClipSpec, UnreadableSampleError, VideoDataset, class_folders, decode_frames,  # noqa: E402
                             read_csv)

STEP = 6  # pixel value = STEP * frame index


def make_video(path, num_frames=40, fps=30, h=24, w=32, codec="ffv1", pix_fmt=None, container_format=None,
               images=None, display_rotation=None):
    """Frame i a solid STEP * i, or ``images[i]`` (h, w, 3 uint8) where given; ``display_rotation``:
    a display matrix turning it that many degrees counter-clockwise, as phones write."""
    with av.open(str(path), "w", format=container_format) as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = w, h
        stream.pix_fmt = pix_fmt or ("yuv444p" if codec == "ffv1" else "yuv420p")
        if display_rotation is not None:
            stream.set_display_rotation(display_rotation)
        for i in range(num_frames):
            img = np.full((h, w, 3), STEP * i, dtype=np.uint8) if images is None else images[i]
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return str(path)


def frame_ids(clip):
    """(C, T, H, W) normalized clip -> the frame index written into each frame."""
    pixels = (clip * STD[0] + MEAN[0]) * 255.0
    return [int(round(float(pixels[:, t].mean()) / STEP)) for t in range(clip.shape[1])]


def test_index_math():
    # span = 4 frames x stride 2 x (30 / 15) = 16 source frames
    assert clip_frame_indices(100, 4, 2, 30, 15, 0, 1) == [42, 47, 52, 57]
    assert [clip_frame_indices(100, 4, 2, 30, 15, k, 3)[0] for k in range(3)] == [0, 42, 84]
    # pySlowFast's test clips with USE_OFFSET_SAMPLING (the MViT configs): the start of clip k of
    # K is k * floor(delta / (K - 1)), one clip floor(delta / 2). delta = 101 - 16 = 85: clip 4
    # of 5 starts at 84, not 85; one clip at 42.
    assert clip_frame_indices(101, 4, 2, 30, 15, 4, 5) == [84, 89, 94, 99]
    assert [clip_frame_indices(101, 4, 2, 30, 15, k, 5)[0] for k in range(5)] == [0, 21, 42, 63, 84]
    assert clip_frame_indices(102, 4, 2, 30, 15, 0, 1) == [43, 48, 53, 58]  # floor(86 / 2)
    # a span of fractional frames (source 25 fps to 30): delta = 100 - 13.33 = 86.67, floor(43.33) = 43
    assert clip_frame_indices(100, 4, 4, 25, 30, 0, 1)[0] == 43
    # short video: indices clamp (and repeat)
    assert clip_frame_indices(5, 4, 4, 30, 30, 0, 1) == [0, 4, 4, 4]
    g = torch.Generator().manual_seed(0)
    idx = clip_frame_indices(100, 8, 4, 30, 30, -1, 1, g)
    assert 0 <= idx[0] <= 100 - 32 and np.all(np.diff(idx) >= 4) and np.all(np.diff(idx) <= 5)


def test_segment_indices_as_pyslowfast_ssv2():
    # 40 frames, 4 segments: s = 39 / 4 = 9.75; bounds round(9.75 i): 0, 10, 20 (19.5, half to even), 29, 39
    assert segment_frame_indices(40, 4) == [5, 15, 24, 34]  # (start + end) // 2
    g = torch.Generator().manual_seed(0)
    draws = [segment_frame_indices(40, 4, g, train=True) for _ in range(200)]
    for i, (lo, hi) in enumerate([(0, 10), (10, 20), (20, 29), (29, 39)]):
        seen = {d[i] for d in draws}
        assert min(seen) == lo and max(seen) == hi  # both ends included, as random.randint
    # short videos repeat frames: s = 2 / 6, bounds 0, 0, 1, 1, 1, 2, 2 -> middles 0, 0, 1, 1, 1, 2
    assert segment_frame_indices(3, 6) == [0, 0, 1, 1, 1, 2]
    with pytest.raises(ValueError, match="no frames"):
        segment_frame_indices(0, 4)


def test_segment_sampling_takes_these_frames(tmp_path):
    path = make_video(tmp_path / "v.mkv", num_frames=40)
    spec = ClipSpec(frames=4, crop=16, temporal_sampling="segments", test_clips=1, test_crops=3)
    views, _ = VideoDataset([(path, 0)], spec, train=False, num_classes=1)[0]
    assert views.shape == (3, 3, 4, 16, 16) and [frame_ids(v) for v in views] == [[5, 15, 24, 34]] * 3
    train = VideoDataset([(path, 0)], ClipSpec(frames=4, crop=16, jitter=(16, 20), temporal_sampling="segments",
                                               inverse_uniform=True, flip=False), train=True, num_classes=1)
    ids = [frame_ids(train[(0, seed)][0]) for seed in range(6)]
    assert all(0 <= a <= 10 <= b <= 20 <= c <= 29 <= d <= 39 for a, b, c, d in ids) and len({tuple(i) for i in ids}) > 1
    with pytest.raises(ValueError, match="--temporal-sampling segments takes one clip"):
        VideoDataset([(path, 0)], ClipSpec(frames=4, crop=16, temporal_sampling="segments", test_clips=2), False, 1)
    with pytest.raises(ValueError, match="--temporal-sampling must be one of"):
        VideoDataset([(path, 0)], ClipSpec(frames=4, crop=16, temporal_sampling="tsn"), False, 1)


def test_decoder_reads_the_frames_asked_for(tmp_path):
    path = make_video(tmp_path / "v.mkv")
    frames, wanted = decode_frames(path, lambda n, fps: [0, 3, 39])
    assert wanted == [0, 3, 39]
    assert [int(round(f.mean() / STEP)) for f in frames] == [0, 3, 39]


def test_a_file_without_a_video_stream_is_unreadable(tmp_path, caplog):
    # It raised IndexError from streams.video[0], which neither training's replacement nor
    # eval's --skip-unreadable catches: the run stopped with a traceback.
    sound = tmp_path / "sound.mkv"
    with av.open(str(sound), "w") as container:
        stream = container.add_stream("mp2", rate=16000)
        for i in range(10):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1152), dtype=np.int16), format="s16", layout="mono")
            frame.sample_rate, frame.pts = 16000, i * 1152
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    with pytest.raises(ValueError, match="has no video stream"):
        decode_frames(str(sound), lambda n, fps: [0])
    good = make_video(tmp_path / "good.mkv", num_frames=12)
    spec = ClipSpec(frames=4, stride=1, target_fps=None, crop=16, jitter=(16, 16), flip=False)
    with caplog.at_level(logging.WARNING, logger="mvit.data"):
        clip, label = VideoDataset([(str(sound), 0), (good, 1)], spec, train=True, num_classes=2)[(0, 5)]
    assert label == 1 and "unreadable video" in caplog.text and "has no video stream" in caplog.text
    with pytest.raises(UnreadableSampleError, match="sound.mkv"):
        VideoDataset([(str(sound), 0)], ClipSpec(frames=4, crop=16, test_clips=1), train=False, num_classes=1)[0]


def test_a_container_that_overstates_its_frames_is_sampled_over_the_frames_it_has(tmp_path):
    # An AVI cut short keeps its header's count (40): frames past the cut were clamped to the
    # last one decoded, so later test clips repeated one frame. pySlowFast samples the frames
    # it decoded; so does the re-ask here.
    whole = tmp_path / "whole.avi"
    noise = np.random.default_rng(0).integers(0, 256, (40, 48, 64, 3), dtype=np.uint8)
    # mjpeg: every frame its own, kilobytes of noise
    make_video(whole, num_frames=40, h=48, w=64, codec="mjpeg", pix_fmt="yuvj420p", images=noise)
    with av.open(str(whole)) as container:  # cut where frame 20's chunk starts: 20 whole frames left
        starts = [packet.pos for packet in container.demux(video=0) if packet.size]
    cut = tmp_path / "cut.avi"
    cut.write_bytes(whole.read_bytes()[: starts[20]])
    with av.open(str(cut)) as container:
        stated = container.streams.video[0].frames
        every = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert stated == 40 and len(every) == 20
    seen = []
    frames, wanted = decode_frames(str(cut), lambda n, fps: seen.append(n) or [0, n // 2, n - 1])
    assert seen == [40, len(every)] and wanted == [0, len(every) // 2, len(every) - 1]
    for frame, i in zip(frames, wanted):
        assert np.array_equal(frame, every[i])


def test_a_size_change_mid_stream_is_scaled_to_the_first_frames_size(tmp_path):
    # Two MPEG-TS segments of different sizes, joined (as a stream switching resolution does):
    # np.stack failed on the mixed shapes and the file counted as unreadable.
    def segment(path, w, h, level):
        make_video(path, num_frames=6, fps=25, h=h, w=w, codec="mpeg2video", container_format="mpegts",
                   images=[np.full((h, w, 3), level, dtype=np.uint8)] * 6)
        return path.read_bytes()

    joined = tmp_path / "joined.ts"
    joined.write_bytes(segment(tmp_path / "a.ts", 64, 48, 40) + segment(tmp_path / "b.ts", 96, 80, 200))
    frames, wanted = decode_frames(str(joined), lambda n, fps: list(range(n)))
    assert frames.shape[1:] == (48, 64, 3) and len(wanted) >= 10
    assert abs(float(frames[0].mean()) - 40) < 8 and abs(float(frames[-1].mean()) - 200) < 8


def test_test_views_take_exactly_these_frames(tmp_path):
    path = make_video(tmp_path / "v.mkv", num_frames=40)
    spec = ClipSpec(frames=4, stride=2, target_fps=30, crop=16, test_clips=2, test_crops=3)
    views, label = VideoDataset([(path, 3)], spec, train=False, num_classes=5)[0]
    assert label == 3 and views.shape == (6, 3, 4, 16, 16)
    # clip 0 starts at 0, clip 1 at 40 - 8 = 32; span 8 -> linspace(s, s + 7, 4) truncated
    expected = [[0, 2, 4, 7]] * 3 + [[32, 34, 36, 39]] * 3
    assert [frame_ids(v) for v in views] == expected


def test_target_fps_stretches_the_clip(tmp_path):
    path = make_video(tmp_path / "v.mkv", num_frames=40, fps=30)
    spec = ClipSpec(frames=4, stride=2, target_fps=15, crop=16, test_clips=1, test_crops=1)
    views, _ = VideoDataset([(path, 0)], spec, train=False, num_classes=1)[0]
    assert frame_ids(views[0]) == [12, 17, 22, 27]  # span 16, centred: start 12


def test_train_clip_is_reproducible_and_ordered(tmp_path):
    path = make_video(tmp_path / "v.mkv", num_frames=40)
    spec = ClipSpec(frames=4, stride=3, target_fps=30, crop=16, jitter=(16, 20), flip=True)
    ds = VideoDataset([(path, 1)], spec, train=True, num_classes=2)
    a, _ = ds[(0, 123)]
    b, _ = ds[(0, 123)]
    assert a.shape == (3, 4, 16, 16) and torch.equal(a, b)
    ids = frame_ids(a)
    assert all(3 <= d <= 4 for d in np.diff(ids)), ids
    starts = {frame_ids(ds[(0, s)][0])[0] for s in range(8)}
    assert len(starts) > 1  # the start is random across samples


def test_train_clip_with_the_papers_crop_and_rand_augment(tmp_path):
    from mvit.data.rand_augment import parse

    path = make_video(tmp_path / "v.mkv", num_frames=40)
    spec = ClipSpec(frames=4, stride=3, target_fps=30, crop=16, crop_scale=(0.08, 1.0),
                    rand_augment=parse("rand-m7-n4-mstd0.5-inc1"), erasing=0.25)
    ds = VideoDataset([(path, 1)], spec, train=True, num_classes=2)
    a, _ = ds[(0, 7)]
    assert a.shape == (3, 4, 16, 16) and torch.equal(a, ds[(0, 7)][0])
    assert not torch.equal(a, ds[(0, 8)][0])


def test_test_views_scale_the_short_side_as_pyslowfast():
    """One crop: the short side to jitter[0], the centre crop; three: the short side to the crop."""
    from mvit.data import transforms as T

    h, w = 24, 40
    frames = (torch.arange(w).view(1, 1, 1, w) * 6 + torch.arange(h).view(1, 1, h, 1)).to(torch.uint8)
    frames = frames.expand(4, 3, h, w).contiguous()
    for crops, short in ((1, 20), (3, 16)):
        spec = ClipSpec(frames=4, crop=16, jitter=(20, 25), test_clips=1, test_crops=crops)
        views = VideoDataset([], spec, train=False, num_classes=1)._transform(frames, None)
        scaled = T.short_side_scale(frames, short, "bilinear", antialias=True)  # as FFmpeg's scaler decodes
        expected = [T.normalize(T.uniform_crop(scaled, 16, c), MEAN, STD).permute(1, 0, 2, 3)
                    for c in ([1] if crops == 1 else [0, 1, 2])]
        assert torch.equal(views, torch.stack(expected))


@pytest.mark.parametrize("crop_scale", [(0.08, 1.0), None], ids=["resized-crop", "jitter"])
def test_training_clips_are_cut_from_frames_decoded_at_the_smallest_scale(crop_scale):
    # pySlowFast decodes Kinetics frames to a short side of TRAIN_JITTER_SCALES[0] before any
    # augmentation; the crops here were cut from the raw frames (1080p: a 5x shrink, aliased).
    from mvit.data import transforms as T

    g = torch.Generator().manual_seed(0)
    frames = torch.randint(0, 256, (4, 3, 90, 160), dtype=torch.uint8, generator=g)
    spec = ClipSpec(frames=4, crop=16, jitter=(20, 25), crop_scale=crop_scale, flip=False)
    clip = VideoDataset([], spec, train=True, num_classes=1)._transform(frames, torch.Generator().manual_seed(5))
    scaled = T.short_side_scale(frames, 20, "bilinear", antialias=True)
    assert scaled.shape[-2:] == (20, 35)
    gen = torch.Generator().manual_seed(5)
    if crop_scale is None:
        cut = T.random_crop(T.random_short_side_scale(scaled, 20, 25, gen=gen), 16, gen)
    else:
        cut = T.random_resized_crop(scaled, 16, crop_scale, spec.crop_ratio, gen)
    assert torch.equal(clip, T.normalize(cut, MEAN, STD).permute(1, 0, 2, 3))
    # Something-Something's frames are read at their own size, as pySlowFast reads them
    segments = ClipSpec(frames=4, crop=16, jitter=(20, 25), temporal_sampling="segments")
    assert VideoDataset([], segments, train=True, num_classes=1).decode_scale() is None


def test_eval_views_follow_the_published_models_settings(tmp_path):
    """mvit eval / predict of published weights (no run's settings): the preset's frame stride
    (3 for the x3 models), normalization (ImageNet's for MViTv2-L 40x3) and views (its 5 x 3); a
    run's own stride wins over its preset's."""
    import argparse

    from mvit.config import IMAGENET_MEAN, IMAGENET_STD, KINETICS_MEAN
    from mvit.data import eval_views
    from mvit.presets import get_preset

    path = make_video(tmp_path / "v.mkv", num_frames=40)
    args = argparse.Namespace(crop_fraction=None, test_clips=None, test_crops=None, sampling_rate=None,
                              target_fps=None, temporal_sampling=None)

    def views_of(preset, **state):
        cfg = get_preset(preset).replace(input_size=(4, 16, 16))
        ds = eval_views(args, {"model_config": cfg, **state}, [(path, 0)], image=False)
        return ds.spec, ds[0][0]

    spec, views = views_of("mvitv2_l_40x3")
    assert (spec.stride, spec.test_clips, spec.test_crops) == (3, 5, 3) and views.shape == (15, 3, 4, 16, 16)
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1, 1)
    pixels = (views * std + mean) * 255.0  # the video is gray: every channel the same value
    assert (pixels - pixels.mean(1, keepdim=True)).abs().max() < 0.01
    ids = [[int(round(float(v[0, t].mean()) / STEP)) for t in range(4)] for v in pixels]
    # span 3 * 4 = 12 frames; the 5 clips start at k * floor((40 - 12) / 4) (pySlowFast's offsets)
    assert ids == [[s, s + 3, s + 7, s + 11] for s in (0, 7, 14, 21, 28) for _ in range(3)]

    spec, views = views_of("mvitv2_b_32x3")
    assert (spec.stride, spec.test_clips, spec.test_crops, spec.mean) == (3, 5, 1, KINETICS_MEAN)
    assert [frame_ids(v) for v in views][1] == [7, 10, 14, 18]
    spec, _ = views_of("mvitv2_b_32x3", args={"sampling_rate": 4})  # a run trained at stride 4
    assert spec.stride == 4
    spec, _ = views_of("mvitv2_s_16x4")
    assert (spec.stride, spec.test_clips, spec.test_crops) == (4, 5, 1)


def test_corrupt_video_is_logged_and_replaced(tmp_path, caplog):
    good = make_video(tmp_path / "good.mkv", num_frames=12)
    bad = tmp_path / "bad.mkv"
    bad.write_bytes(b"\x1aE\xdf\xa3 not really a video" * 10)
    spec = ClipSpec(frames=4, stride=1, target_fps=None, crop=16, jitter=(16, 16), flip=False)
    ds = VideoDataset([(str(bad), 0), (good, 1)], spec, train=True, num_classes=2)
    with caplog.at_level(logging.WARNING, logger="mvit.data"):
        clip, label = ds[(0, 5)]
    assert label == 1 and clip.shape == (3, 4, 16, 16)
    assert "unreadable video" in caplog.text and "bad.mkv" in caplog.text


def test_copies_of_a_video_take_the_same_frames_augmented_differently(monkeypatch):
    # Each copy drew its own clip start: pySlowFast decodes one clip and augments it twice.
    from mvit.data import video

    taken = []

    def fake_decode(path, indices_for, display=False):
        wanted = indices_for(300, 30.0)
        taken.append(wanted)
        frame = np.random.default_rng(len(taken)).integers(0, 255, (1, 40, 48, 3), dtype=np.uint8)
        return np.repeat(frame, len(wanted), axis=0), wanted

    monkeypatch.setattr(video, "decode_frames", fake_decode)
    spec = ClipSpec(frames=4, stride=4, crop=32, jitter=(40, 48), crop_scale=(0.08, 1.0))
    ds = VideoDataset([("a.mp4", 0)], spec, train=True, num_classes=1)
    first, second, other = ds[(0, 11, 7)], ds[(0, 12, 7)], ds[(0, 11, 8)]
    assert taken[0] == taken[1] != taken[2]  # one clip seed, one clip
    assert not torch.equal(first[0], second[0])  # augmented by their own seeds


def test_a_corrupt_test_video_is_an_error_naming_it(tmp_path):
    # Test views stand for their own video: another one in its place was scored under the broken
    # one's label, counting a video twice.
    good = make_video(tmp_path / "good.mkv", num_frames=12)
    bad = tmp_path / "bad.mkv"
    bad.write_bytes(b"\x1aE\xdf\xa3 not really a video" * 10)
    spec = ClipSpec(frames=4, stride=1, target_fps=None, crop=16, jitter=(16, 16), flip=False)
    ds = VideoDataset([(good, 1), (str(bad), 0)], spec, train=False, num_classes=2)
    assert ds[0][0].shape == (1, 3, 4, 16, 16)
    with pytest.raises(UnreadableSampleError, match=rf"cannot read the video {bad} \(.*\); every listed video is "
                                                    r"scored, so fix the file, remove it from the list, or pass --skip-unreadable"):
        ds[1]


def test_lists_and_class_folders(tmp_path):
    for cls in ("jump", "run"):
        os.makedirs(tmp_path / "train" / cls)
        (tmp_path / "train" / cls / "a.mp4").write_bytes(b"")
    items, classes = class_folders(str(tmp_path), "train")
    assert classes == ["jump", "run"] and [l for _, l in items] == [0, 1]
    csv = tmp_path / "train.csv"
    csv.write_text("x/a.mp4 3\n/abs/b.mp4 0\n")
    assert read_csv(str(csv), "/root") == [("/root/x/a.mp4", 3), ("/abs/b.mp4", 0)]
    csv.write_text("x/a.mp4 1,4\n")
    assert read_csv(str(csv), multi_label=True) == [("x/a.mp4", (1, 4))]


def _ssv2_lists(folder, entries):
    """The download's layout: labels (template -> number as a string) beside the lists."""
    import json

    labels = {"Pushing something from left to right": "1", "Holding something": "0",
              "Turning something upside down": "2"}
    (folder / "something-something-v2-labels.json").write_text(json.dumps(labels))
    path = folder / "something-something-v2-train.json"
    path.write_text(json.dumps(entries))
    return str(path)


def test_something_something_json_lists(tmp_path):
    from mvit.data.video import read_list

    path = _ssv2_lists(tmp_path, [
        {"id": "78687", "label": "holding potato", "template": "Holding [something]", "placeholders": ["potato"]},
        {"id": "42326", "label": "pushing a cup from left to right",
         "template": "Pushing [something] from left to right", "placeholders": ["a cup"]},
    ])
    items, classes = read_list(path, "/data/ssv2")
    assert items == [("/data/ssv2/78687.webm", 0), ("/data/ssv2/42326.webm", 1)]
    assert classes == ["Holding something", "Pushing something from left to right", "Turning something upside down"]
    assert read_list(path, "/data/ssv2", num_classes=3)[1] == classes
    with pytest.raises(ValueError, match="3 classes in something-something-v2-labels.json, more than 2"):
        read_list(path, num_classes=2)
    with pytest.raises(ValueError, match="one label per video"):
        read_list(path, multi_label=True)
    bad = _ssv2_lists(tmp_path, [{"id": "1", "template": "Dropping [something]"}])
    with pytest.raises(ValueError, match="template 'Dropping something' is not in"):
        read_list(bad)
    test_list = _ssv2_lists(tmp_path, [{"id": "1"}])
    with pytest.raises(ValueError, match="has no template, so no label"):
        read_list(test_list)
    (tmp_path / "something-something-v2-labels.json").unlink()
    with pytest.raises(FileNotFoundError, match="need something-something-v2-labels.json beside them"):
        read_list(test_list)


def test_train_sampler_sharding_repeats_and_resume():
    n, world = 10, 2
    samplers = [TrainSampler(n, r, world, repeats=2, seed=1) for r in range(world)]
    for s in samplers:
        s.set_epoch(3)
    parts = [s.epoch_items() for s in samplers]
    # every sample twice per epoch over all ranks, as pySlowFast's AUG.NUM_SAMPLE 2 (DeiT's count,
    # 5 a rank here, read only half the videos each epoch)
    assert all(len(p) == 10 for p in parts)
    assert sorted(i for p in parts for i, _, _ in p) == sorted(list(range(n)) * 2)
    seeds = [seed for p in parts for _, seed, _ in p]
    assert len(set(seeds)) == len(seeds)  # repeated copies get different augmentation seeds
    # and one clip seed: the same frames, as pySlowFast augments one decoded clip NUM_SAMPLE times
    clip_seeds = {}
    for i, _, clip_seed in (item for p in parts for item in p):
        clip_seeds.setdefault(i, set()).add(clip_seed)
    assert all(len(c) == 1 for c in clip_seeds.values()) and len({c.pop() for c in clip_seeds.values()}) == n
    samplers[0].set_epoch(3, start=2)
    assert list(samplers[0]) == parts[0][2:] and len(samplers[0]) == 8
    # an odd count pads the last round as before: 7 samples x 2 copies on 3 ranks, 5 items each
    odd = [TrainSampler(7, r, 3, repeats=2, seed=1).epoch_items() for r in range(3)]
    assert [len(p) for p in odd] == [5, 5, 5] and set(i for p in odd for i, _, _ in p) == set(range(7))
    samplers[0].set_epoch(4)
    assert samplers[0].epoch_items() != parts[0]
    # repeats=1: a permutation of the whole set split across ranks
    plain = [TrainSampler(n, r, world, repeats=1, seed=1).epoch_items() for r in range(world)]
    assert sorted(i for p in plain for i, _, _ in p) == list(range(n))
    assert sorted(shard_indices(7, 0, 3) + shard_indices(7, 1, 3) + shard_indices(7, 2, 3)) == list(range(7))


class _Frame:
    """Stands in for av.VideoFrame: records the keywords of to_ndarray."""

    def __init__(self, accepts_threads=True):
        self.accepts_threads, self.calls = accepts_threads, []

    def to_ndarray(self, **kwargs):
        self.calls.append(kwargs)
        if "threads" in kwargs and not self.accepts_threads:
            raise TypeError("reformat() got an unexpected keyword argument 'threads'")
        return np.zeros((2, 2, 3), np.uint8)


def test_frames_are_converted_to_rgb_in_the_calling_thread(monkeypatch):
    # PyAV's default scaler thread pool, inherited by forked DataLoader workers, hung them
    # (PyAV 19): the decoder asks for one thread, and falls back for releases without the argument.
    from mvit.data import video

    monkeypatch.setattr(video, "_RGB", {"format": "rgb24", "threads": 1})
    frame = _Frame()
    video._to_rgb(frame)
    assert frame.calls == [{"format": "rgb24", "threads": 1}]
    old = _Frame(accepts_threads=False)
    assert video._to_rgb(old).shape == (2, 2, 3) and video._to_rgb(old).dtype == np.uint8
    assert old.calls == [{"format": "rgb24", "threads": 1}, {"format": "rgb24"}, {"format": "rgb24"}]


def test_forked_worker_decodes_after_the_parent_did(tmp_path):
    # The hang above: the parent decodes (as evaluation in the main process does), then a forked
    # worker decodes again. A timeout turns a hang into a failure.
    path = make_video(tmp_path / "v.mkv")
    decode_frames(path, lambda n, fps: list(range(n)))
    ds = VideoDataset([(path, 0)], ClipSpec(frames=4, stride=3, target_fps=30, crop=16, jitter=(16, 20)), train=True,
                      num_classes=2)
    loader = torch.utils.data.DataLoader(ds, batch_size=1, num_workers=1, timeout=60,
                                         multiprocessing_context="fork")
    (clip, label), = list(loader)
    assert clip.shape == (1, 3, 4, 16, 16) and label.tolist() == [0]


@pytest.mark.parametrize("spec, train, message", [
    (ClipSpec(frames=4, crop=32, jitter=(16, 40)), True, "--jitter-scales 16 40: the short side is scaled to at least"),
    (ClipSpec(frames=4, crop=32, jitter=(48, 40)), True, "MIN <= MAX"),
    (ClipSpec(frames=4, crop=16, crop_scale=(0.5, 1.2)), True, "--crop-scale must be MIN MAX with 0 < MIN <= MAX <= 1"),
    (ClipSpec(frames=4, crop=16, crop_scale=(0.0, 1.0)), True, "--crop-scale must be MIN MAX"),
    (ClipSpec(frames=4, crop=16, jitter=(16, 20), erasing=1.5), True, "--random-erasing is a probability"),
    (ClipSpec(frames=4, crop=16, stride=0), True, "--sampling-rate must be >= 1"),
    (ClipSpec(frames=4, crop=16, test_clips=0), False, "--test-clips must be >= 1"),
    (ClipSpec(frames=4, crop=16, test_crops=2), False, "--test-crops must be 1 or 3"),
])
def test_settings_no_video_could_satisfy_fail_up_front(tmp_path, spec, train, message):
    # These used to fail inside __getitem__, where they were taken for unreadable videos and
    # retried on other samples until "11 videos in a row could not be read".
    path = make_video(tmp_path / "v.mkv", num_frames=12)
    with pytest.raises(ValueError, match=message):
        VideoDataset([(path, 0)], spec, train=train, num_classes=2)


def test_only_decoding_errors_are_retried(tmp_path, monkeypatch, caplog):
    from mvit.data import video

    path = make_video(tmp_path / "v.mkv", num_frames=12)
    ds = VideoDataset([(path, 0), (path, 1)], ClipSpec(frames=4, stride=1, target_fps=None, crop=16, jitter=(16, 20)),
                      train=True, num_classes=2)

    def broken(*args, **kwargs):
        raise KeyError("a bug in a transform")

    monkeypatch.setattr(video.T, "normalize", broken)
    with caplog.at_level(logging.WARNING, logger="mvit.data"), pytest.raises(KeyError, match="a bug in a transform"):
        ds[(0, 1)]
    assert "unreadable video" not in caplog.text  # not passed off as a bad file


def test_list_labels_are_range_checked_with_file_and_line(tmp_path):
    csv = tmp_path / "val.csv"
    csv.write_text("a.mp4 0\n\nb.mp4 2\nc.mp4 5\n")
    assert [l for _, l in read_csv(str(csv), num_classes=6)] == [0, 2, 5]
    with pytest.raises(ValueError, match=rf"{csv}:4: label 5 is outside \[0, 3\) \(3 classes\)"):
        read_csv(str(csv), num_classes=3, classes_from=" (3 classes)")
    csv.write_text("a.mp4 1\nb.mp4 -1\n")
    with pytest.raises(ValueError, match=rf"{csv}:2: label -1 is negative; class ids count from 0"):
        read_csv(str(csv))
    csv.write_text("a.mp4 1,2\nb.mp4 0,4\n")  # multi-label: every id of the line
    with pytest.raises(ValueError, match=rf"{csv}:2: label 4 is outside \[0, 4\)"):
        read_csv(str(csv), multi_label=True, num_classes=4)
    with pytest.raises(ValueError, match="comma-separated labels need --multi-label"):
        read_csv(str(csv))


def test_validation_class_folders_must_be_training_classes(tmp_path):
    for split, names in (("train", ("jump", "run")), ("val", ("jump", "run", "swim"))):
        for cls in names:
            os.makedirs(tmp_path / split / cls)
            (tmp_path / split / cls / "a.mp4").write_bytes(b"")
    _, classes = class_folders(str(tmp_path), "train")
    with pytest.raises(ValueError, match="class folders the training classes lack: swim"):
        class_folders(str(tmp_path), "val", classes=classes)  # its videos were skipped silently


def _turned(stored, degrees):
    """(T, H, W, 3) frames as shown after a turn of ``degrees`` counter-clockwise, pixel by pixel."""
    t, h, w, _ = stored.shape
    if degrees % 360 == 0:
        return stored
    if degrees % 360 == 180:  # shown[i, j] = stored[h-1-i, w-1-j]
        return stored[:, ::-1, ::-1]
    shown = np.empty((t, w, h, 3), stored.dtype)
    for i in range(w):
        for j in range(h):
            # clockwise (-90, a phone held upright): the stored frame's bottom-left corner shows at the top left
            shown[:, i, j] = stored[:, h - 1 - j, i] if degrees % 360 == 270 else stored[:, j, w - 1 - i]
    return shown


@pytest.mark.parametrize("degrees", [-90, 90, 180, 0])
def test_display_orientation_turns_frames_as_players_show_them(tmp_path, degrees):
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (24, 32, 3), dtype=np.uint8) for _ in range(3)]
    path = make_video(tmp_path / "phone.mkv", num_frames=3, images=images, display_rotation=degrees)
    every = lambda n, fps: list(range(n))  # noqa: E731
    stored, _ = decode_frames(path, every)  # the default: as stored, as pySlowFast reads it
    # (RGB -> YUV -> RGB rounds by up to 2)
    np.testing.assert_allclose(stored.astype(int), np.stack(images).astype(int), atol=2)
    shown, _ = decode_frames(path, every, display=True)
    np.testing.assert_array_equal(shown, _turned(stored, degrees))


def test_the_older_rotate_tag_counts_clockwise():
    from types import SimpleNamespace

    from mvit.data.video import _display_quarter_turns

    untagged = SimpleNamespace()  # a PyAV without VideoFrame.rotation
    assert [_display_quarter_turns(untagged, tag) for tag in ("90", "180", "270", "0", None)] == [3, 2, 1, 0, 0]
    assert _display_quarter_turns(SimpleNamespace(rotation=-90), None) == 3
    assert _display_quarter_turns(SimpleNamespace(rotation=0), "90") == 3  # no display matrix on the frame


def test_a_portrait_video_gives_portrait_test_views_with_display_orientation(tmp_path):
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 255, (24, 32, 3), dtype=np.uint8) for _ in range(8)]
    path = make_video(tmp_path / "phone.mkv", num_frames=8, images=images, display_rotation=-90)
    spec = dict(frames=2, stride=1, crop=16, jitter=(16, 20), test_clips=1, test_crops=3)
    stored = VideoDataset([(path, 0)], ClipSpec(**spec), False, 3)._decode(path, torch.Generator())
    shown = VideoDataset([(path, 0)], ClipSpec(**spec, orientation="display"), False, 3)._decode(
        path, torch.Generator())
    assert stored.shape[-2:] == (24, 32) and shown.shape[-2:] == (32, 24)
    torch.testing.assert_close(shown, torch.from_numpy(_turned(stored.permute(0, 2, 3, 1).numpy(), -90).copy())
                               .permute(0, 3, 1, 2))
    with pytest.raises(ValueError, match=r"--orientation must be one of \('stored', 'display'\), got 'upright'"):
        VideoDataset([(path, 0)], ClipSpec(**spec, orientation="upright"), False, 3)


def test_eval_reads_as_its_run_did_unless_told():
    from mvit import build_model
    from mvit.cli import build_parser
    from mvit.data import eval_views

    cfg = build_model("mvit_tiny").cfg

    def orientation(run_args, *argv):
        args = build_parser().parse_args(["eval", "run", *argv])
        return eval_views(args, {"model_config": cfg, "args": run_args}, [("clip.mp4", 0)], False).spec.orientation

    assert orientation({}) == "stored"  # the reference pipelines' reading, and older runs'
    assert orientation({"orientation": None}) == "stored"
    assert orientation({"orientation": "display"}) == "display"  # a run trained on phone videos read upright
    assert orientation({"orientation": "display"}, "--orientation", "stored") == "stored"
    assert build_parser().parse_args(["predict", "run", "clip.mp4"]).orientation == "display"
