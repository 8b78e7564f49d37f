"""Credit for contributors: each expert's leave-one-out contribution to a release."""
