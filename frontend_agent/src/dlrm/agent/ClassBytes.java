package dlrm.agent;

import java.util.Arrays;

/** What the agent's byte-level patches of TorchServe's classes share. */
final class ClassBytes {
    private ClassBytes() {}

    /** Where {@code pattern} first occurs in {@code data} at or after {@code from}, or -1. */
    static int indexOf(byte[] data, byte[] pattern, int from) {
        for (int start = from; start <= data.length - pattern.length; start++) {
            if (Arrays.equals(data, start, start + pattern.length, pattern, 0, pattern.length)) {
                return start;
            }
        }
        return -1;
    }
}
