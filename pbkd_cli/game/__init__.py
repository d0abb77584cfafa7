"""The min-max game's parts (`stages/minmax.py` is its loop): the adversaries that play its max step
(`adversaries`), the student's rollouts and policy-gradient step (`student`), and the figures it
reports (`figures`)."""
