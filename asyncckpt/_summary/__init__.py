"""The summary layer: TensorBoard event files (protobuf bytes, TFRecord framing, writer)."""
