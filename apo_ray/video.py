"""MP4 episode videos: the agentview frames, upscaled for viewing, with a coloured border while the
corrector is in control, so a reviewer sees every intervention at a glance."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from apo_ray.fsio import atomic_path
from apo_ray.schema import C_CORRECTOR, C_UNDESIRABLE

BORDER_COLORS = {
    C_CORRECTOR: (230, 40, 40),    # red: the corrector acts
    C_UNDESIRABLE: (250, 170, 0),  # amber: relabelled pre-intervention steps (when known)
}
BORDER = 4


def frame_with_border(image: np.ndarray, c: int, scale: int) -> np.ndarray:
    """Nearest-neighbour upscale (keeps pixels honest) and paint the border for label ``c``."""
    frame = np.repeat(np.repeat(image, scale, axis=0), scale, axis=1)
    color = BORDER_COLORS.get(int(c))
    if color is not None:
        frame = frame.copy()
        frame[:BORDER], frame[-BORDER:], frame[:, :BORDER], frame[:, -BORDER:] = color, color, color, color
    return frame


def write_mp4(dest: str | os.PathLike[str], images: np.ndarray, labels: np.ndarray, fps: int = 20,
              min_size: int = 256) -> Path:
    """Write (T, H, W, 3) uint8 frames with per-step labels ``c`` to an H.264 MP4, atomically."""
    import imageio.v2 as imageio

    dest = Path(dest)
    scale = max(1, -(-min_size // images.shape[1]))
    with atomic_path(dest) as tmp:
        writer = imageio.get_writer(tmp, format="FFMPEG", mode="I", fps=fps, codec="libx264",
                                    macro_block_size=1, pixelformat="yuv420p", output_params=["-an"])
        try:
            for img, c in zip(images, labels, strict=True):
                writer.append_data(frame_with_border(img, int(c), scale))
        finally:
            writer.close()
    return dest
