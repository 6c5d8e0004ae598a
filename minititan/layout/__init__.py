"""The glue between core/, collectives/ and schedules/ and the training loop: parallelize.build makes a Layout."""
