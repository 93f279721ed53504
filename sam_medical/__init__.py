"""sam_medical: Segment Anything for medical volumes.

The core library. It never imports ``monailabel``; ``monailabel_app`` adapts it to MONAI Label.

Coordinate convention used everywhere (see ``sam_medical.canvas.geometry``):
a volume array is kept in stored IJK order, shape ``(I, J, K)``; slice ``k`` is ``volume[:, :, k]``,
an image of height ``I`` (rows, ``i``) and width ``J`` (columns, ``j``). A voxel ``[i, j, k]`` is the
SAM point ``(x=j, y=i)`` on slice ``k``.
"""

__version__ = "0.1.0"
