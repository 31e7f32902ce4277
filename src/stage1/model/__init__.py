"""The tokenizer: frozen encoders, quantizers, the nearest-code search, k-means, the decoder, VQRAE and its config,
RAE's files, the Hub. Imports only base."""
