package dlrm.agent;

import java.io.IOException;
import java.io.InputStream;
import java.lang.instrument.ClassFileTransformer;
import java.lang.instrument.Instrumentation;
import java.security.ProtectionDomain;

/**
 * A Java agent (-javaagent, set in config.properties' vmargs) that loads this project's
 * OpenInferenceProtocolRequestHandler in place of TorchServe's.
 *
 * <p>TorchServe 0.12 answers /v2/health and /v2 but not the Open Inference Protocol's model
 * metadata and model readiness routes, and offers no supported way to add them: an endpoint
 * plugin is keyed by the first path segment, so a "v2" plugin would also capture every
 * /v2/models/{m}/infer request, whose body TorchServe releases before a plugin runs. The
 * class replaced here is the last link of the frontend's request chain, reached only by
 * /v2 requests that no inference route took, which is exactly where the missing routes
 * belong. The replacement is compiled against the installed TorchServe jar, so a TorchServe
 * whose internals changed fails at build time, not while serving.
 */
public final class OipRoutesAgent {
    static final String TARGET = "org/pytorch/serve/http/api/rest/OpenInferenceProtocolRequestHandler";
    static final String REPLACEMENT = "/replacement/OpenInferenceProtocolRequestHandler.class.bin";

    private OipRoutesAgent() {}

    public static void premain(String arguments, Instrumentation instrumentation) throws IOException {
        byte[] replacement;
        try (InputStream stream = OipRoutesAgent.class.getResourceAsStream(REPLACEMENT)) {
            if (stream == null) {
                throw new IOException("the agent jar lacks " + REPLACEMENT);
            }
            replacement = stream.readAllBytes();
        }
        instrumentation.addTransformer(
                new ClassFileTransformer() {
                    @Override
                    public byte[] transform(
                            ClassLoader loader,
                            String className,
                            Class<?> redefined,
                            ProtectionDomain domain,
                            byte[] original) {
                        return TARGET.equals(className) && redefined == null ? replacement : null;
                    }
                });
    }
}
