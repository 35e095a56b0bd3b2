"""The OpenAI completion request path: prepare (chat template, tokenize), dispatch, format."""
