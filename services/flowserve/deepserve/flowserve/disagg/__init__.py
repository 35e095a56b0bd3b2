"""PD disaggregation: the prefill-side and decode-side flows of a KV hand-off between instances."""
