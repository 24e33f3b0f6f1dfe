package dlrm.agent;

import java.io.IOException;
import java.io.InputStream;
import java.lang.instrument.ClassFileTransformer;
import java.lang.instrument.Instrumentation;
import java.security.ProtectionDomain;
import java.util.Map;
import java.util.function.UnaryOperator;

/**
 * A Java agent (-javaagent, set in config.properties' vmargs) that changes three classes of
 * TorchServe 0.12's frontend as they load; nothing else of it is touched. Every TorchServe
 * internal it relies on is listed in docs/torchserve-internals.md.
 *
 * <p>OpenInferenceProtocolRequestHandler is replaced by this project's: TorchServe 0.12 answers
 * /v2/health and /v2 but not the Open Inference Protocol's model metadata and model readiness
 * routes, and offers no supported way to add them: an endpoint plugin is keyed by the first
 * path segment, so a "v2" plugin would also capture every /v2/models/{m}/infer request, whose
 * body TorchServe releases before a plugin runs. The class replaced here is the last link of
 * the frontend's request chain, reached only by /v2 requests that no inference route took,
 * which is exactly where the missing routes belong. The replacement is compiled against the
 * installed TorchServe jar, so a TorchServe whose internals changed fails at build time, not
 * while serving.
 *
 * <p>ModelServer gets {@link StandardServiceRegistration}: its gRPC inference server also serves
 * the Open Inference Protocol's standard inference.GRPCInferenceService
 * ({@link StandardInferenceService}), which standard clients call, beside TorchServe's own
 * org.pytorch.serve.grpc.openinference.GRPCInferenceService.
 *
 * <p>WorkerThread gets {@link ImmediateFirstRestart}: a dead worker's first restart at once
 * instead of after TorchServe's fixed one-second back-off.
 */
public final class FrontendAgent {
    static final String OIP_HANDLER = "org/pytorch/serve/http/api/rest/OpenInferenceProtocolRequestHandler";
    static final String REPLACEMENT = "/replacement/OpenInferenceProtocolRequestHandler.class.bin";

    private FrontendAgent() {}

    public static void premain(String arguments, Instrumentation instrumentation) throws IOException {
        byte[] replacement;
        try (InputStream stream = FrontendAgent.class.getResourceAsStream(REPLACEMENT)) {
            if (stream == null) {
                throw new IOException("the agent jar lacks " + REPLACEMENT);
            }
            replacement = stream.readAllBytes();
        }
        Map<String, UnaryOperator<byte[]>> changes =
                Map.of(
                        OIP_HANDLER, original -> replacement,
                        StandardServiceRegistration.TARGET, StandardServiceRegistration::patch,
                        ImmediateFirstRestart.TARGET, ImmediateFirstRestart::patch);
        instrumentation.addTransformer(
                new ClassFileTransformer() {
                    @Override
                    public byte[] transform(
                            ClassLoader loader,
                            String className,
                            Class<?> redefined,
                            ProtectionDomain domain,
                            byte[] original) {
                        UnaryOperator<byte[]> change = changes.get(className);
                        return change != null && redefined == null ? change.apply(original) : null;
                    }
                });
    }
}
