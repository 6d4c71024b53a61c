"""CLIF's augmentation builder (paper section 4.1, appendix A.1.1): a few photos per concept
become many image-text pairs, streamed into the dataset format of `engine/data/augmented_dataset.py`.

- G-Aug (`global`): a concept's cut-out next to 1..k common concepts from the bank, on a plain
  canvas at random positions and scales - "a photo of <alice> and a policeman".
- R-Aug (`region`): sub-regions of the intact cut-out (over-segmented, e.g. by SAM automatic
  mode), labelled against a vocabulary (e.g. by the CLIP labeller), composed with common
  concepts - "a photo of <alice>'s hair and a straw hat".
- M-Aug (`mix`): two concepts left and right at random scales - "a photo of <alice> and <bob>";
  every pair of concepts appears `mix_per_pair` times.

Every pair is made from (seed, kind, index) alone, so a rerun after Cancel (or a crash, or a
full disk) continues where it stopped and the result equals an uninterrupted run. Elements
are pasted with a binary alpha, and each element's mask is its visible pixels, so a mask
covers exactly the pixels of its element. Nothing accumulates in memory per pair.

The common-concept bank is either generated with the loaded base model (each image cached on
disk under a key of model, prompt and seed, so a rerun makes only the missing ones) or read
from a folder. Bank images are cut out of their plain background (`matte_plain_background`).

Region proposal and labelling are passed in as functions (`RegionProposer`, `Labeller`), so
the engine does not depend on a particular segmenter; the node wires SAM and CLIP in.

Parts: `cutout`, `bank`, `parts`, `compose`, `kinds`, `build`, `preview`."""
