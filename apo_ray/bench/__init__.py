"""Measurement and proof tools, kept out of the pipeline's import graph: ``apo-ray bench`` (data, rollout, train),
the chaos run (``make chaos``) and the autoscaling run (``make test-autoscale``). Nothing in apo_ray imports them
except the bench CLI."""
