"""Stream stages: verification, decompression and read-ahead, for bytes on their way.

The pull path chains them (receive + hash | inflate + diff_id | tar), each
stage on its own thread, handing recycled buffers down the line.
"""
