"""The QLoRA training engine: model loading, data order, the train step, exact resume."""
