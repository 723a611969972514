"""What the teacher sees of an image: its captions and object boxes, read from COCO-style files.

As in LLaVA's data generation, a context is rendered as the captions, one per line, then one line
per object: `name: [x1, y1, x2, y2]` with coordinates normalised to 0-1. Attributes an instance carries
(the shapes world's size and colour) go in front of the category name."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..core.errors import DataError

ATTRIBUTES = ("size", "colour", "color")


@dataclass
class Context:
    id: str
    image: str  # file name relative to the image folder
    width: int
    height: int
    captions: list[str] = field(default_factory=list)
    boxes: list[dict] = field(default_factory=list)  # {"name": "small red circle", "bbox": [x1, y1, x2, y2], ...}


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{path}: not found") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON (line {e.lineno}: {e.msg})") from None
    if not isinstance(data, dict) or "images" not in data or "annotations" not in data:
        raise DataError(f"{path}: not a COCO annotation file (needs 'images' and 'annotations')")
    return data


def load_coco(captions_file: str | Path, instances_file: str | Path | None = None) -> list[Context]:
    """Contexts for every image of a COCO captions file, with boxes from the instances file if given
    (COCO's [x, y, w, h] pixels turned into normalised [x1, y1, x2, y2])."""
    captions = _read(Path(captions_file))
    contexts: dict[int, Context] = {}
    for image in captions["images"]:
        contexts[image["id"]] = Context(str(image["id"]), image["file_name"], int(image["width"]),
                                        int(image["height"]))
    for i, ann in enumerate(captions["annotations"]):
        if ann.get("image_id") not in contexts or not isinstance(ann.get("caption"), str):
            raise DataError(f"{captions_file}: annotation {i} has no known image_id or no caption")
        contexts[ann["image_id"]].captions.append(ann["caption"].strip())
    if instances_file is not None:
        instances = _read(Path(instances_file))
        names = {c["id"]: c["name"] for c in instances.get("categories", [])}
        for i, ann in enumerate(instances["annotations"]):
            context = contexts.get(ann.get("image_id"))
            if context is None:
                continue
            if ann.get("category_id") not in names or len(ann.get("bbox", [])) != 4:
                raise DataError(f"{instances_file}: annotation {i} has an unknown category_id or a bad bbox")
            x, y, w, h = ann["bbox"]
            bbox = [round(x / context.width, 3), round(y / context.height, 3),
                    round((x + w) / context.width, 3), round((y + h) / context.height, 3)]
            words = [str(ann[a]) for a in ATTRIBUTES if a in ann] + [names[ann["category_id"]]]
            context.boxes.append({"name": " ".join(words), "category": names[ann["category_id"]], "bbox": bbox,
                                  **{a: ann[a] for a in ATTRIBUTES if a in ann}})
    return [c for c in contexts.values() if c.captions]


def describe(context: Context, boxes: bool = True) -> str:
    """The teacher's view of one image: captions, then (optionally) boxes."""
    lines = list(context.captions)
    if boxes and context.boxes:
        lines.append("")
        lines += [f"{b['name']}: [{', '.join(f'{v:.2f}' for v in b['bbox'])}]" for b in context.boxes]
    return "\n".join(lines)
