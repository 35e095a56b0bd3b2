"""Native CPU kernels FlowServe builds once per host (`python -m deepserve.flowserve.kernels`).

Engines only load what is built; without a compiler they keep their pure-torch paths.
"""
