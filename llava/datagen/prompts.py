"""The teacher's instructions for the three kinds of LLaVA instruction data, with few-shot examples.

Written for this project after the method of LLaVA's data generation (Liu et al. 2023, appendix):
the teacher never sees the image, only captions and boxes, and is asked to write as if it could see
it. Responses use LLaVA's exchange format (`Question:` / `===` / `Answer:`), which `parse.py` reads."""

from __future__ import annotations

from .context import Context, describe

KINDS = ("conversation", "detail", "complex_reasoning")

_VIEW = ("You are an AI visual assistant looking at a single image. What you are given instead of the image is "
         "several sentences describing it and, for each object, its name and bounding box as normalised "
         "[x1, y1, x2, y2] coordinates (0 to 1, left to right and top to bottom).")

SYSTEM = {
    "conversation": _VIEW + " Write a conversation between you and a person asking about this image, answering "
    "in the tone of an assistant that is looking at the image. Ask about what can be said with confidence: "
    "the kinds of objects, their colours, how many there are, where they are and how they relate to one "
    "another. Include questions whose answers need some reasoning as well as simple ones. Never mention the "
    "captions or the coordinates; speak of what is seen. Format every exchange exactly as:\n"
    "Question:\n<question>\n===\nAnswer:\n<answer>\n===\nand write between three and six exchanges.",
    "detail": _VIEW + " Describe the image in detail, as if you were looking at it: every object with its colour, "
    "size and place in the picture, how the objects are arranged, and the background. Do not mention the "
    "captions, the boxes or any coordinates. Write one paragraph of plain prose.",
    "complex_reasoning": _VIEW + " Write one question about the image that needs reasoning to answer (counting "
    "under a condition, comparing objects, what would change if something moved or disappeared), and answer "
    "it step by step as if looking at the image, without mentioning captions or coordinates. Format:\n"
    "Question:\n<question>\n===\nAnswer:\n<answer>",
}

_EXAMPLE = Context("example", "example.png", 64, 64, captions=[
    "A large red circle at the top left and a small blue square in the center.",
    "Two shapes on a grey background: a red circle and a blue square.",
], boxes=[{"name": "large red circle", "bbox": [0.03, 0.04, 0.3, 0.31]},
          {"name": "small blue square", "bbox": [0.42, 0.41, 0.58, 0.57]}])

FEW_SHOT = {
    "conversation": [(_EXAMPLE, "Question:\nHow many shapes are in the image?\n===\nAnswer:\nThere are two shapes in "
                      "the image: a red circle and a blue square.\n===\nQuestion:\nWhere is the red circle?\n===\n"
                      "Answer:\nThe red circle is at the top left of the image.\n===\nQuestion:\nWhich shape is "
                      "bigger?\n===\nAnswer:\nThe red circle is bigger; the blue square in the center is small.")],
    "detail": [(_EXAMPLE, "The image shows two shapes on a plain grey background. A large red circle sits at the "
                "top left corner, and a small blue square is placed right in the center of the picture. The "
                "circle is clearly the bigger of the two, and the rest of the image is empty.")],
    "complex_reasoning": [(_EXAMPLE, "Question:\nIf the red circle were taken away, what would be left in the "
                           "image?\n===\nAnswer:\nOnly the small blue square would remain. The image holds two "
                           "shapes, the red circle at the top left and the blue square in the center, so removing "
                           "the circle leaves the square on its own in the middle of the grey background.")],
}

# Instructions a user gives for a detailed description (as LLaVA samples one per detail record).
DETAIL_INSTRUCTIONS = (
    "Describe the following image in detail.",
    "Provide a detailed description of the given image.",
    "Give an elaborate explanation of the image you see.",
    "Share a comprehensive rundown of the presented image.",
    "Offer a thorough analysis of the image.",
    "Explain the various aspects of the image before you.",
    "Clarify the contents of the displayed image with great detail.",
    "Characterize the image using a well-detailed description.",
    "Break down the elements of the image in a detailed manner.",
    "Walk through the important details of the image.",
    "Portray the image with a rich, descriptive narrative.",
    "Narrate the contents of the image with precision.",
    "Analyze the image in a comprehensive and detailed manner.",
    "Illustrate the image through a descriptive explanation.",
    "Examine the image closely and share its details.",
    "Write an exhaustive depiction of the given image.",
)


def messages(kind: str, context: Context) -> list[dict]:
    """The chat messages sent to the teacher for one context."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; use {', '.join(KINDS)}")
    out = [{"role": "system", "content": SYSTEM[kind]}]
    for example, response in FEW_SHOT[kind]:
        out += [{"role": "user", "content": describe(example)}, {"role": "assistant", "content": response}]
    out.append({"role": "user", "content": describe(context)})
    return out
