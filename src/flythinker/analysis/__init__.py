"""Analyses of trained models beyond their scores: the Reasoner's latent trajectories (`.trajectories`, the paper's
App. H / Figure 7). The analyses of scored predictions (Impr., difficulty levels) are `flythinker.evaluation.analyses`;
the verb is `flythinker analyze` (`flythinker.cli.analyze`)."""
