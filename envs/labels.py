"""Step labels ``c`` and the intervention id, as the corrector writes them (the paper's convention)."""

C_UNDESIRABLE = 0  # assigned later by the data pipeline's relabel stage
C_POLICY = 1
C_CORRECTOR = 2
NO_INTERVENTION = -1
