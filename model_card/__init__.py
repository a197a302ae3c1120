"""The Hub model card of Diffutoon for diffusers and `assemble`, which builds a Hub-ready folder."""
