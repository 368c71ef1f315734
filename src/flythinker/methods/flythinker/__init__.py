"""FlyThinker (the paper's method): a Reasoner whose latent states are fused into the Generator at every position,
trained jointly with one teacher-forced pass of each, decoded with both stepping concurrently.

config.py: the fusion settings; model.py: the equations, forward, save/load; decode.py: the two-model decode
step; method.py: its entry in the `flythinker.methods.METHODS` registry. No imports here, so any of them can be
imported alone.
"""

