"""What the paper profile's data is made of: one table of the downloadable files (URLs, official first, then
mirrors; expected size and checksum where one is known, with its source; where each file goes under the data
root). :mod:`ris_utils.download` fetches and verifies them; :mod:`ris_utils.data.paper` checks that they are
in place."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Source:
    """One downloadable file.

    Attributes:
      name: the ``--what`` name.
      urls: official URL first, then mirrors (tried in order when one fails).
      filename: name of the downloaded file.
      dest: folder (relative to ``--data-root``) the file goes to (archives: ``downloads``).
      size: expected size in bytes (None = unknown: recorded in the lock file on first download).
      sha256 / md5: expected digest (None = unknown).
      checksum_source: where ``size`` / the digest come from (shown in messages).
      extract_to: for zip archives, the folder (relative to ``--data-root``) the archive unpacks into.
      provides: paths (relative to ``--data-root``) that exist once the entry is in place; when all exist,
        nothing is downloaded.
      note: one line shown by ``--list``.
      manual: no automatic download; ``note`` says how to get it.
    """

    name: str
    urls: tuple[str, ...]
    filename: str
    dest: str
    size: int | None = None
    sha256: str | None = None
    md5: str | None = None
    checksum_source: str = "none published: recorded in checksums.lock.json on first download"
    extract_to: str | None = None
    provides: tuple[str, ...] = ()
    note: str = ""
    manual: bool = False
    aliases: tuple[str, ...] = field(default_factory=tuple)


_REFER_NOTE = ("REFER annotations (Licheng Yu's cleaned RefCOCO family, github.com/lichengunc/refer); the UNC "
               "server is often down, the Internet Archive capture is the mirror")
_REFER_SUMS = ("sha256 of the Internet Archive capture as recorded by a third-party project "
               "(not published by the dataset authors); size recorded on first download")


def _refer(name: str, sha256: str, capture: str, provides: tuple[str, ...]) -> Source:
    base = "bvisionweb1.cs.unc.edu/licheng/referit/data"
    return Source(
        name=name,
        urls=(f"https://{base}/{name}.zip", f"https://web.archive.org/web/{capture}id_/https://{base}/{name}.zip"),
        filename=f"{name}.zip", dest="downloads", sha256=sha256, checksum_source=_REFER_SUMS,
        extract_to=".", provides=provides, note=_REFER_NOTE,
    )


#: The source table. Sizes and digests: see each entry's ``checksum_source``.
SOURCES: dict[str, Source] = {s.name: s for s in (
    _refer("refcoco", "7f924bb7ed8dc4568058e4ff626281918d56e5206f4c868c5a80f088f38c8bf0", "20220413011718",
           ("refcoco/refs(unc).p", "refcoco/instances.json")),
    _refer("refcoco+", "5f1238112d63199e68da54a28f201471909b21ded7ed79a57d51b4c1443c6b45", "20220413011656",
           ("refcoco+/refs(unc).p", "refcoco+/instances.json")),
    _refer("refcocog", "3d1f7e5b2ff2205940bf59de55f861f5f2cc1403fb980669933a7f9af1aa8211", "20220413012904",
           ("refcocog/refs(umd).p", "refcocog/instances.json")),
    Source(
        name="coco-train2014",
        # https first; the plain-http URL (the one COCO's site links) only as a fallback: the file is checked by
        # size + md5 before it is used either way
        urls=("https://images.cocodataset.org/zips/train2014.zip", "http://images.cocodataset.org/zips/train2014.zip"),
        filename="train2014.zip", dest="downloads", size=13_510_573_713, md5="0da8c0bd3d6becc4dcb32757491aca88",
        checksum_source=("size = the server's Content-Length; md5 as recorded by third-party loaders (LAVIS, "
                         "pystiche); COCO publishes no checksum"),
        extract_to="images/mscoco/images", provides=("images/mscoco/images/train2014",),
        note="COCO train2014 images (82,783 files, 13.5 GB zip): every RefCOCO/+/g image is in it",
    ),
    Source(
        name="sam-vit-h", urls=("https://dl.fbaipublicfiles.com/segment_anything/sam_vit_h_4b8939.pth",),
        filename="sam_vit_h_4b8939.pth", dest="checkpoints", size=2_564_550_879,
        sha256="a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e",
        md5="4b8939a88964f0f4ff5f5b2642c598a6",
        checksum_source=("md5 prefix in Meta's file name (4b8939); full md5/sha256 and size as recorded by "
                         "several third-party downloaders"),
        provides=("checkpoints/sam_vit_h_4b8939.pth",), note="SAM ViT-H (the paper's mask generator)",
        aliases=("sam", "sam-vit_h"),
    ),
    Source(
        name="sam-vit-l", urls=("https://dl.fbaipublicfiles.com/segment_anything/sam_vit_l_0b3195.pth",),
        filename="sam_vit_l_0b3195.pth", dest="checkpoints", size=1_249_524_607,
        sha256="3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622",
        checksum_source="md5 prefix in Meta's file name (0b3195); sha256/size as recorded by third-party downloaders",
        provides=("checkpoints/sam_vit_l_0b3195.pth",), note="SAM ViT-L (not used by the paper; smaller GPUs)",
    ),
    Source(
        name="sam-vit-b", urls=("https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth",),
        filename="sam_vit_b_01ec64.pth", dest="checkpoints", size=375_042_383,
        sha256="ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912",
        checksum_source="md5 prefix in Meta's file name (01ec64); sha256/size as recorded by third-party downloaders",
        provides=("checkpoints/sam_vit_b_01ec64.pth",), note="SAM ViT-B (not used by the paper; quick trials)",
    ),
    Source(
        name="coca-cc3m",
        urls=("https://huggingface.co/SeonghoonYu/pseudo-ris/resolve/main/epoch_1.pt",
              "https://huggingface.co/SeonghoonYu/pseudo-ris/resolve/main/logs/laion_cc3m/checkpoints/epoch_1.pt"),
        filename="coca_laion_cc3m_epoch_1.pt", dest="checkpoints",
        provides=("checkpoints/coca_laion_cc3m_epoch_1.pt",),
        note=("the authors' CoCa ViT-L/14 (LAION-2B, fine-tuned by them on CC3M): the paper's captioner "
              "(distinctive_caption_generation.py l. 35-47 loads logs/laion_cc3m/checkpoints/epoch_1.pt), an "
              "open_clip training checkpoint from the Hugging Face repo SeonghoonYu/pseudo-ris, loaded with "
              "open_clip's pretrained=<path>; the file's path inside that repo is not documented: the two "
              "likely ones are tried, else put epoch_1.pt there by hand"),
        aliases=("coca", "coca-laion-cc3m"),
    ),
    Source(
        name="cutler", urls=("https://dl.fbaipublicfiles.com/cutler/checkpoints/cutler_cascade_final.pth",),
        filename="cutler_cascade_final.pth", dest="checkpoints",
        provides=("checkpoints/cutler_cascade_final.pth",),
        note=("CutLER cascade Mask R-CNN (the authors' SAM-mask selector; needs detectron2, run it outside "
              "this package and pass its detections as masks.external_masks)"),
    ),
    Source(
        name="phrasecut", urls=("https://github.com/ChenyunWu/PhraseCutDataset",), filename="", dest="phrasecut",
        provides=("phrasecut",), manual=True,
        note=("PhraseCut (the unseen-domain benchmark, Visual Genome images): download with the dataset's own "
              "script (git clone https://github.com/ChenyunWu/PhraseCutDataset && python download_dataset.py) "
              "and link its data/VGPhraseCut_v0 folder as DIR/phrasecut"),
    ),
)}

#: What the paper profile needs (``--what paper``).
GROUPS = {
    "paper": ("refcoco", "refcoco+", "refcocog", "coco-train2014", "sam-vit-h", "coca-cc3m"),
    "refer": ("refcoco", "refcoco+", "refcocog"),
}
