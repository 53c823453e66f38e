"""Constants shared by the model, the data pipeline and evaluation."""

# Label value ignored by the LM cross-entropy (PyTorch's default ignore_index).
IGNORE_INDEX = -100

# Text placeholder for one image. The data pipeline expands each placeholder into
# `num_image_tokens` copies of the tokenizer's id for it; the model replaces those
# positions by the projected vision features (one feature per copy).
IMAGE_TOKEN = "<image>"

# `model_type` of the model's transformers config (config.json): what marks a folder as ours.
MODEL_TYPE = "moe_llava"
