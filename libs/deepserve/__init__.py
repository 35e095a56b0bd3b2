"""DeepServe: serverless LLM serving at scale."""
