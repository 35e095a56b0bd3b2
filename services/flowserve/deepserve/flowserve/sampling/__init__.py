"""Token sampling (torch): the step's sampler, its penalties and each request's sampling state.

The parameters themselves (`SamplingParams`) are a contract shared with the gateway and live in
deepserve.sampling_params.
"""
